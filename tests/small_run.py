"""The small experiment several end-to-end tests check, and how it is run: as a user runs it, `gmm-cil serve` in
one process and `gmm-cil run --announce` on a pseudo-terminal in another. One run (minutes) serves the terminal
test (what the screen shows), the pipeline's end to end (results, store, the service moved to each version and
answering as the evaluation did) and the scale-out guarantees (the uninterrupted reference every other way of
running it must reproduce)."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from tests.ray_cluster import free_port

GMM_CIL = Path(sys.executable).with_name("gmm-cil")

# 2 tasks of 2 QuickDraw classes; 3 epochs of 4 steps per worker, so a kill after an update's first epoch lands
# with two epochs (seconds) still to run; pseudo replay, so task 2's batches draw from a seeded replay as well;
# every baseline, so a killed and resumed driver must restore each of them too
OVERRIDES = ["name=small-run", "seed=7", "dataset.train_per_class=16", "dataset.test_per_class=4",
             "scenario.num_classes=4", "scenario.increment=2", "scenario.order_seed=5",
             "train.num_workers=2", "train.threads_per_worker=1", "train.batch_size=4", "train.epochs=3",
             "train.placement_strategy=SPREAD", "replay.mode=pseudo",
             "baselines=[ncm,linear_sequential,joint,ridge]"]

TOKEN = "client-api-token"
ADMIN_TOKEN = "job-announce-admin-token"  # what the job announces with
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READY = "GMM-CIL serving at"  # what `gmm-cil serve` prints once it answers (serve/launch.py)
OFFLINE = {"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}


def job_arguments(output_dir: Path) -> list[str]:
    return [arg for o in [*OVERRIDES, f"output_dir={output_dir}"] for arg in ("--set", o)]


def small_config(output_dir: Path, *overrides: str):
    """The small experiment's config, as `gmm-cil run` with job_arguments(output_dir) reads it (then `overrides`)."""
    from cil_platform.cli import load_checked

    return load_checked(None, [*OVERRIDES, f"output_dir={output_dir}", *overrides])


def on_a_terminal(argv: list[str], cwd: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run argv with stdout and stderr on a 120x40 pseudo-terminal; (exit code, everything written to it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                               env={**os.environ, **(env or {})}, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                data = b""
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    else:
        process.kill()
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@contextmanager
def a_service(store: Path, log: Path, timeout: float = 600) -> Iterator[str]:
    """`gmm-cil serve` of `store` on a local Ray of its own, with an API and an admin token: its URL while it is up.
    Stopped as a user stops it (SIGTERM), then its process group is killed."""
    port = free_port()
    env = {**os.environ, **OFFLINE, "GMM_CIL_SERVE_TOKEN": TOKEN, "GMM_CIL_SERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    with open(log, "w") as out:
        process = subprocess.Popen([str(GMM_CIL), "serve", "--store", str(store), "--port", str(port),
                                    "--num-cpus", "2"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gmm-cil serve did not come up (exit {process.poll()}): "
                                   f"{log.read_text()[-3000:]}")
            # `serving at` is printed once every deployment is RUNNING; /healthz alone is the Ingress, which can
            # answer while the Captioner is still loading its models (a /v1/model then waits for it)
            if READY in log.read_text():
                break
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its Ray is left
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def served_model(url: str, version: int, timeout_s: float = 120.0) -> dict:
    """/v1/model once `version` is served (the last announcement may still be rolling out)."""
    deadline, model = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        model = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
        if model.get("version") == version:
            break
        time.sleep(1)
    return model


@dataclass(frozen=True)
class Served:
    """What the service said: before anything was published, once the last version was served, and to every test
    image of the run's classes (in load_dataset's order), sent as PNGs by 4 concurrent clients."""

    status_before: int
    model: dict
    test_rows: list[dict]
    answers: list[dict]


def ask_the_service(url: str, output_dir: Path, version: int) -> tuple[dict, list[dict], list[dict]]:
    from cil_platform.data import load_dataset
    from tests.test_datasets import png_bytes

    model = served_model(url, version)
    cfg = small_config(output_dir)
    rows = load_dataset(cfg.dataset, classes=model.get("seen_classes") or []).test.dataset.take_all()

    def ask(row) -> dict:
        image = png_bytes(np.asarray(row["image"], dtype=np.uint8))
        response = httpx.post(f"{url}/v1/classify", content=image, timeout=120,
                              headers={"Content-Type": "image/png", **AUTH})
        return {"status": response.status_code, **(response.json() if response.status_code == 200 else
                                                   {"text": response.text})}

    with ThreadPoolExecutor(4) as pool:  # concurrent, so the Captioner batches them as it would any traffic
        return model, rows, list(pool.map(ask, rows))


@dataclass(frozen=True)
class SmallRun:
    exit_code: int
    screen: str  # everything the terminal received
    output_dir: Path
    served: Served | None = None

    def config(self):
        return small_config(self.output_dir)


def run_small_experiment(workdir: Path) -> SmallRun:
    """`gmm-cil run --fresh --announce` of the small experiment, on a local Ray of its own, into workdir/run, beside a
    `gmm-cil serve` of its store; the service is asked afterwards (Served), then stopped."""
    out = workdir / "run"
    with a_service(out / "store", workdir / "serve.log") as url:
        before = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).status_code
        code, screen = on_a_terminal([str(GMM_CIL), "run", "--fresh", *job_arguments(out), "--announce", url],
                                     workdir, 900, env={**OFFLINE, "GMM_CIL_SERVE_ADMIN_TOKEN": ADMIN_TOKEN})
        (workdir / "screen.txt").write_text(screen)  # kept by pytest with the tmp dir: what the terminal received
        served = Served(before, *ask_the_service(url, out, version=1)) if code == 0 else None
    return SmallRun(code, screen, out, served)
