"""What the kill tests wait for and whom they kill: Ray Train's checkpoints and worker processes, seen from outside."""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil

from cil_platform.training.worker import POSITION_FILE

# Ray Train (V2) writes this file under <storage>/<run name>/ once the controller has registered a
# checkpoint; from then on a restarted worker group is handed that checkpoint.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.1)


def checkpointed(storage: Path, update: str) -> bool:
    """Whether a session under `storage` has registered (RAY_TRAIN_SNAPSHOT names it) a checkpoint that ends an
    epoch of `update`: from then on a restarted worker group or session is handed it."""
    for position in storage.rglob(POSITION_FILE):  # <storage>/[<config hash>/]<session>/checkpoint_*/
        snapshot = position.parent.parent / RAY_TRAIN_SNAPSHOT
        try:
            if json.loads(position.read_text())["update"] == update and position.parent.name in snapshot.read_text():
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


def ray_train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes descending from this process (Ray instances it or its children started)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found
