"""Fault tolerance with real kills (SIGKILL, no raised exceptions), real models and QuickDraw:

- a Ray Train worker killed mid-task: the worker group restarts from the last epoch checkpoint and the
  fit ends with exactly the projection of an uninterrupted fit with the same seed;
- the driver (jobs/incremental.py) killed mid-run: the same command resumes after the last completed
  task and ends with exactly the accuracy matrix of an uninterrupted run; the store stays intact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load as load_tensors

from cil_platform.class_stats import ClassStatistics
from cil_platform.config import ExperimentConfig
from cil_platform.features import features_for
from cil_platform.paths import REPO_ROOT
from cil_platform.replay import PseudoFeatureReplay
from cil_platform.storage.store import ProjectionStore
from cil_platform.training.fit import FitSpec, fit_projection
from cil_platform.training.session import SessionSpec, TrainingSession
from cil_platform.training.worker import POSITION_FILE
from gmm_model import create_encoder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # `make test-slow`: minutes of multi-process runs each

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
    """This test's Ray Train worker processes (descendants of this process: our own Ray instance only)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found



def test_a_killed_training_worker_restarts_from_its_checkpoint_and_matches_an_uninterrupted_fit(tmp_path, own_ray):
    cfg = ExperimentConfig(dataset={"kind": "quickdraw", "train_per_class": 16, "test_per_class": 1},
                           output_dir=str(tmp_path))
    encoder = create_encoder(cfg.stack)
    features, _ = features_for(cfg, encoder.identity, ["apple", "cat", "dog"])
    stats = ClassStatistics()  # an old class to replay: exercises the per-epoch replay RNG
    stats.learn(features.select(["apple"]))
    fit = dict(name="task-001", features=features.select(["cat", "dog"]), start=None,
               replay=PseudoFeatureReplay(stats).payload(), stack=cfg.stack, visual_width=encoder.width,
               cache_dir=cfg.cache_dir, train=cfg.train.model_copy(update={"epochs": 3, "batch_size": 4, "num_workers": 2}),
               replay_ratio=1.0, seed=0, max_failures=1)

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fit_projection, FitSpec(storage_url=str(tmp_path / "killed"), **fit))
        wait_for(lambda: (tmp_path / "killed" / "task-001" / RAY_TRAIN_SNAPSHOT).exists() or future.done(), 600,
                 "the first registered checkpoint")
        assert not future.done(), f"the fit ended before a checkpoint was registered: {future.exception()}"
        workers = ray_train_workers()
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed = future.result(timeout=600)

    assert 1 <= killed.metrics["start_epoch"] <= 2  # the last report came from a worker group restored mid-fit
    uninterrupted = fit_projection(FitSpec(storage_url=str(tmp_path / "uninterrupted"), **fit))
    assert uninterrupted.metrics["start_epoch"] == 0
    a, b = load_tensors(killed.projection), load_tensors(uninterrupted.projection)
    assert a.keys() == b.keys()
    for name in a:  # tolerance 0: same seeds, same shards, same restored optimizer state
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max().item())


def test_a_worker_killed_in_a_sessions_second_update_resumes_it_and_matches_an_uninterrupted_session(tmp_path, own_ray):
    """One session, two updates: a worker SIGKILLed after the second update's first checkpoint. The restarted group
    skips the answered first update, resumes the second from its epoch, and ends with the uninterrupted weights."""
    cfg = ExperimentConfig(dataset={"kind": "quickdraw", "train_per_class": 12, "test_per_class": 1},
                           output_dir=str(tmp_path))
    encoder = create_encoder(cfg.stack)
    features, _ = features_for(cfg, encoder.identity, ["apple", "cat", "dog"])
    first_task, second_task = features.select(["apple"]), features.select(["cat", "dog"])
    train = cfg.train.model_copy(update={"epochs": 3, "batch_size": 4, "num_workers": 2})

    def session_run(storage: Path, kill: bool):
        spec = SessionSpec(name="experiment", stack=cfg.stack, visual_width=encoder.width, cache_dir=cfg.cache_dir,
                           train=train, storage_url=str(storage), max_failures=1)
        with TrainingSession(spec) as session:
            one = session.fit("task-000", first_task, None, seed=1)
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(session.fit, "task-001", second_task, one.projection, 2)
                if kill:
                    wait_for(lambda: checkpointed(storage, "task-001") or future.done(), 600,
                             "the second update's first checkpoint")
                    assert not future.done(), "the update ended before it was checkpointed"
                    victim = ray_train_workers()[0]
                    victim.send_signal(signal.SIGKILL)
                    victim.wait(timeout=30)
                return future.result(timeout=900)

    killed = session_run(tmp_path / "killed", kill=True)
    assert 1 <= killed.metrics["start_epoch"] <= 2
    uninterrupted = session_run(tmp_path / "uninterrupted", kill=False)
    a, b = load_tensors(killed.projection), load_tensors(uninterrupted.projection)
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max().item())


SMALL_RUN = ["--set", "name=resume", "--set", "dataset.train_per_class=8", "--set", "dataset.test_per_class=4",
             "--set", "scenario.num_classes=6", "--set", "scenario.increment=2", "--set", "scenario.order_seed=5",
             "--set", "train.num_workers=1", "--set", "train.batch_size=4",
             "--set", "replay.mode=exemplar", "--set", "replay.selection=random", "--set", "replay.budget=6"]


def job(output_dir: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "jobs" / "incremental.py"), "--set", f"output_dir={output_dir}", *SMALL_RUN]


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray of its own
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_to_completion(output_dir: Path) -> str:
    # a 3-task run takes minutes on an idle 2-core box; 15 min was too short on a shared one (load ~60)
    done = subprocess.run(job(output_dir), env=job_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def methods(output_dir: Path) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    return {name: (row["task_acc"], row["overall"]) for name, row in results["methods"].items()}


def test_a_killed_driver_resumes_after_its_last_completed_task_with_the_same_results(tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # the jobs start their own Ray; free this process' instance first
    out = tmp_path / "killed"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(job(out), env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # task 1 committed (store version and run state), and the session has checkpointed task 2's update:
            # the resumed driver's session must restore that checkpoint, not retrain from task 1's weights
            wait_for(lambda: (out / "run_state" / "task-0000" / "state.json").exists() and
                     checkpointed(out / "ray_train", "task-001") or first.poll() is not None, 600,
                     "task 1 to complete and task 2 to be checkpointed")
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            try:  # the killed driver's own Ray processes, if any outlived it (its process group only)
                os.killpg(first.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    store = ProjectionStore(str(out / "store"))
    assert store.versions() == [0]
    task1_published = store.manifest(0).created_at

    resumed_log = run_to_completion(out)
    assert "resuming" in resumed_log and "1 of 3 tasks were completed" in resumed_log, resumed_log[-3000:]
    assert "task 1/3:" not in resumed_log and "task 2/3:" in resumed_log and "task 3/3:" in resumed_log
    assert store.versions() == [0, 1, 2]
    assert store.manifest(0).created_at == task1_published  # task 1 was not trained or published again
    for version in store.versions():
        store.load(version)  # sha256 and size checked against the manifest: raises on a corrupt entry

    run_to_completion(tmp_path / "uninterrupted")
    assert methods(out) == methods(tmp_path / "uninterrupted")  # every method's accuracy matrix, exactly
