"""`ray job submit --working-dir . -- python jobs/incremental.py ...` against a local `ray start --head`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Kill only the processes of the cluster under `temp_dir` (`ray stop` would kill every Ray on the machine)."""
    for _ in range(2):
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(1)


def wait_for_job_agent(address: str, env: dict, timeout_s: float = 120.0) -> None:
    """The job server answers before its agent is up ("No available agent"): submit a no-op until it runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                               env=env, capture_output=True, text=True, timeout=120)
        if probe.returncode == 0 or time.monotonic() > deadline:
            assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
            return
        time.sleep(2)


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node in its own processes, its dashboard (the job server) on 127.0.0.1."""
    # as in an activated virtualenv: the job's `python` is the one that has this project's packages
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    # own agent ports: the defaults collide with any other Ray instance on this machine
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_agent(address, env)
        yield address, env
    finally:
        stop_cluster(temp_dir)


def test_job_submit_runs_the_experiment_on_the_cluster(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "run"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "jobs/incremental.py",
               "--set", "name=submitted", "--set", f"output_dir={out}",
               "--set", "dataset.train_per_class=8", "--set", "dataset.test_per_class=4",
               "--set", "scenario.num_classes=4", "--set", "scenario.increment=2",
               "--set", "train.num_workers=1", "--set", "train.threads_per_worker=2", "--set", "train.batch_size=8",
               "--set", "replay.mode=exemplar", "--set", "replay.budget=8", "--set", "eval.decode=free",
               "--set", "eval.actors=1", "--set", "baselines=[ncm]"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    results = json.loads((out / "results.json").read_text())
    gmm = results["methods"]["gmm[exemplar,free]"]
    assert len(gmm["overall"]) == 2
    assert gmm["memory_bytes"] == 8 * 4 * 1280 * 2  # 8 exemplar feature sets, fp16
    assert sorted(p.name for p in (out / "store").iterdir()) == ["v0000", "v0001"]
