"""The small experiment several end-to-end tests check, and how it is run: `gmm-cil run` on a pseudo-terminal,
as a user runs it. One run (minutes) serves both the terminal test (what the screen shows) and the scale-out
guarantees (the uninterrupted reference every other way of running it must reproduce)."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

GMM_CIL = Path(sys.executable).with_name("gmm-cil")

# 2 tasks of 2 QuickDraw classes; 3 epochs of 4 steps per worker, so a kill after an update's first epoch lands
# with two epochs (seconds) still to run; pseudo replay, so task 2's batches draw from a seeded replay as well
OVERRIDES = ["name=small-run", "seed=7", "dataset.train_per_class=16", "dataset.test_per_class=4",
             "scenario.num_classes=4", "scenario.increment=2", "scenario.order_seed=5",
             "train.num_workers=2", "train.threads_per_worker=1", "train.batch_size=4", "train.epochs=3",
             "train.placement_strategy=SPREAD", "replay.mode=pseudo", "baselines=[ncm]"]


def job_arguments(output_dir: Path) -> list[str]:
    return [arg for o in [*OVERRIDES, f"output_dir={output_dir}"] for arg in ("--set", o)]


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


@dataclass(frozen=True)
class SmallRun:
    exit_code: int
    screen: str  # everything the terminal received
    output_dir: Path


def run_small_experiment(workdir: Path) -> SmallRun:
    """`gmm-cil run --fresh` of the small experiment, on a local Ray of its own, into workdir/run."""
    out = workdir / "run"
    code, screen = on_a_terminal([str(GMM_CIL), "run", "--fresh", *job_arguments(out)], workdir, 900,
                                 env={"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    (workdir / "screen.txt").write_text(screen)  # kept by pytest with the tmp dir: what the terminal received
    return SmallRun(code, screen, out)
