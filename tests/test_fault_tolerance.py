"""Fault tolerance of the training layer alone, with real kills (SIGKILL), real models and QuickDraw: a Ray Train
worker killed mid-update, in a standalone fit and in a session's second update, restarts from the last epoch
checkpoint and ends with exactly the projection of an uninterrupted run with the same seed. (The whole job's
guarantees, a killed worker and then a killed driver, run in the default suite: tests/test_job_guarantees.py.)
"""
from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from cil_platform.class_stats import ClassStatistics
from cil_platform.config import ExperimentConfig
from cil_platform.features import features_for
from cil_platform.replay import PseudoFeatureReplay
from cil_platform.training.fit import FitSpec, fit_projection
from cil_platform.training.session import SessionSpec, TrainingSession
from gmm_model import create_encoder
from tests.kills import RAY_TRAIN_SNAPSHOT, checkpointed, ray_train_workers, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # `make test-slow`: minutes of multi-process runs each


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
