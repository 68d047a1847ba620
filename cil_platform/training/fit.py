"""One projection update on its own (stage-1 alignment, a benchmark's task): `fit_projection(FitSpec)`.

A session of one update (session.py): each worker loads the frozen LLM, wraps only the projection for data
parallelism (train.backend: DDP, or DeepSpeed with the ZeRO stage and precision of its JSON config; backends.py),
trains on its own equal shard of a seeded permutation with replayed samples of old classes in every batch, and
reports a checkpoint after every epoch, so a restarted worker group resumes from it. An experiment runs all its
tasks in one session instead (experiment.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gmm_model.spec import ModelStack

from ..features import FeatureSet, FeatureTable
from .config import TrainConfig
from .session import FitResult, SessionSpec, TrainingSession
from .worker import session_worker_loop

__all__ = ["FitResult", "FitSpec", "fit_projection"]


@dataclass(frozen=True)
class FitSpec:
    """Everything one projection update needs. `name` is the Ray Train run name under `storage_url`
    ("alignment", "task-003"): a fit of the same name there resumes from its newest checkpoint."""

    name: str
    features: FeatureSet | FeatureTable  # the new classes' cached features (streamed, or in memory)
    start: bytes | None  # the starting projection (safetensors); None: the stack's projection_init, else fresh
    stack: ModelStack
    visual_width: int
    cache_dir: str
    train: TrainConfig
    storage_url: str
    seed: int
    replay: dict | None = None  # a replay memory's payload: old classes' samples drawn into every batch
    replay_ratio: float = 0.0
    storage_options: dict | None = None
    max_failures: int = 1


def fit_projection(spec: FitSpec, worker_loop: Callable[[dict], None] = session_worker_loop) -> FitResult:
    """Run one projection update in a session of its own; returns the trained weights.
    (`worker_loop` is the worker body; tests wrap session_worker_loop to inject a failure.)"""
    if len(spec.features) == 0:
        raise ValueError(f"{spec.name}: no training images")
    train = spec.train.model_copy(update={"num_workers": min(spec.train.num_workers, len(spec.features))})
    session = SessionSpec(name=spec.name, stack=spec.stack, visual_width=spec.visual_width, cache_dir=spec.cache_dir,
                          train=train, storage_url=spec.storage_url, storage_options=spec.storage_options,
                          max_failures=spec.max_failures)
    with TrainingSession(session, worker_loop) as running:
        return running.fit(spec.name, spec.features, spec.start, spec.seed, spec.replay, spec.replay_ratio)
