"""A Ray cluster of separate `ray start` processes on this machine, for the tests that use the real CLI.

Safe beside other Ray instances on a shared machine: every node has its own --temp-dir and its own agent
ports (the defaults collide with any other Ray here), the job server listens on 127.0.0.1, and stopping
kills only this cluster's processes (`ray stop` would kill every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> list[str]:
    """`ray start` flags for the ports whose defaults are fixed numbers, so two nodes here would collide."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def kill_processes_under(temp_dir: str) -> None:
    """Kill the processes whose command line names `temp_dir` (every Ray process of nodes started there)."""
    for _ in range(2):
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(1)


def entries(listing: subprocess.CompletedProcess) -> list[dict]:
    """The JSON of `ray list ... --format json`, which prints a sentence instead of `[]` when nothing matches."""
    text = listing.stdout.strip()
    return json.loads(text) if text.startswith("[") else []


@dataclass
class LocalCluster:
    temp_dir: str
    gcs_address: str  # what `ray start --address` joins
    address: str  # the job server (dashboard), http://127.0.0.1:port
    env: dict = field(repr=False)  # for the `ray` CLI: token auth, and the venv's `python` first on PATH
    start_output: list[str] = field(default_factory=list, repr=False)  # of every `ray start`, for errors

    def ray(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def submit(self, *entrypoint: str, working_dir: Path, timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` run in `working_dir`; returns when the job has ended."""
        return self.ray("job", "submit", "--address", self.address, "--working-dir", ".", "--", *entrypoint,
                        timeout=timeout, cwd=working_dir)

    def start_node(self, *args: str) -> None:
        """`ray start ...`. Its wait for the new raylet to register is a hard-coded 30 s: on a busy machine it
        gives up while the node still comes up, so wait_for_nodes judges success, not the exit code."""
        started = self.ray("start", *args, "--node-ip-address=127.0.0.1", *own_ports(), "--disable-usage-stats",
                           timeout=600)
        self.start_output.append(started.stdout[-1500:] + started.stderr[-1500:])

    def add_node(self, num_cpus: int) -> None:
        """One more node (its own raylet, object store and agents) that joins the head."""
        node_dir = Path(self.temp_dir, f"n{len(self.start_output)}")
        node_dir.mkdir()
        self.start_node(f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--temp-dir={node_dir}")

    def list_state(self, kind: str, *filters: str, detail: bool = False) -> subprocess.CompletedProcess:
        return self.ray("list", kind, "--address", self.address, "--format", "json", "--limit", "10000",
                        *[arg for f in filters for arg in ("--filter", f)], *(["--detail"] if detail else []))

    def state(self, kind: str, *filters: str, detail: bool = False) -> list[dict]:
        """Ray's state API (`ray list nodes|actors ...`), dead entries included."""
        listing = self.list_state(kind, *filters, detail=detail)
        assert listing.returncode == 0, listing.stdout[-2000:] + listing.stderr[-2000:]
        return entries(listing)

    def wait_for_nodes(self, count: int, timeout_s: float = 300.0) -> list[str]:
        """Node ids once `count` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        while True:
            listing = self.list_state("nodes", "state=ALIVE")
            alive = [node["node_id"] for node in entries(listing)] if listing.returncode == 0 else []
            if len(alive) >= count:
                assert len(alive) == count, f"{len(alive)} nodes alive, expected {count}"
                return alive
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(alive)} of {count} nodes alive after {timeout_s:.0f} s; "
                                     + "\n".join(["ray start said:", *self.start_output, listing.stderr[-1500:]]))
            time.sleep(2)

    def wait_for_job_agent(self, timeout_s: float = 300.0) -> None:
        """The job server answers before its agent is up ("No available agent"): submit a no-op until it runs."""
        deadline = time.monotonic() + timeout_s
        while True:
            probe = self.ray("job", "submit", "--address", self.address, "--", "python", "-c", "pass")
            if probe.returncode == 0 or time.monotonic() > deadline:
                assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
                return
            time.sleep(2)


@contextmanager
def local_cluster(num_cpus: int = 2, extra_nodes: int = 0) -> Iterator[LocalCluster]:
    """A head node (job server on 127.0.0.1) plus `extra_nodes` nodes, each with `num_cpus` logical CPUs;
    yields once the nodes are alive and the job agent accepts jobs, and kills them all afterwards."""
    # as in an activated virtualenv: a job's `python` is the one that has this project's packages
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",  # `ray start --head` gives up after 60 s on a busy machine
           "RAY_num_workers_soft_limit": "16",  # as init_ray's IDLE_WORKERS_KEPT: feature reads reuse idle workers
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    dashboard, gcs = free_port(), free_port()
    cluster = LocalCluster(temp_dir, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    try:
        cluster.start_node("--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}")
        for _ in range(extra_nodes):
            cluster.add_node(num_cpus)
        cluster.wait_for_nodes(1 + extra_nodes)
        cluster.wait_for_job_agent()
        yield cluster
    finally:
        kill_processes_under(temp_dir)
