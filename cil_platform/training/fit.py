"""One Ray Train fit per projection update (stage-1 alignment, or one task): `fit_projection(FitSpec)`.

The update's cached features travel with the fit (Ray's object store) and each worker trains on its
own equal shard of a seeded permutation. Each worker loads the frozen LLM itself (a fast safetensors
read once de-quantised), wraps only the projection for data parallelism (train.backend: DDP, or
DeepSpeed with the ZeRO stage and precision of its JSON config; see backends.py), and draws replayed
samples of old classes from the memory's payload into every batch. A fresh AdamW with linear warm-up
and cosine decay is created per fit. A checkpoint (projection plus the backend's optimizer/scheduler
state and the epoch) is reported after every epoch, so a restarted worker group resumes from it.
The worker body is worker.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gmm_model.spec import ModelStack
from gmm_model.llm import prepare_llm

from .deepspeed_config import deepspeed_settings, low_precision
from ..features import FeatureTable
from ..storage import open_storage
from .backends import PROJECTION_FILE
from .config import TrainConfig
from .worker import WorkerJob, fit_worker_loop


@dataclass(frozen=True)
class FitSpec:
    """Everything one projection update needs. `name` is the Ray Train run name under `storage_url`
    ("alignment", "task-003"): a fit of the same name there resumes from its newest checkpoint."""

    name: str
    features: FeatureTable  # the new classes' cached features
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


@dataclass
class FitResult:
    projection: bytes
    loss: float
    images: int  # samples processed, new and replayed (all epochs, all workers)
    seconds: float
    metrics: dict = field(default_factory=dict)  # rank 0's last report: loss, memory per worker, ...


def fit_projection(spec: FitSpec, worker_loop: Callable[[dict], None] = fit_worker_loop) -> FitResult:
    """Run one projection update as one TorchTrainer fit; returns the trained weights.
    (`worker_loop` is the worker body; tests wrap fit_worker_loop to inject a failure.)"""
    if len(spec.features) == 0:
        raise ValueError(f"{spec.name}: no training images")
    start = time.perf_counter()
    train = spec.train
    prepare_llm(spec.stack.llm, spec.cache_dir)  # here, once: workers of rank > 0 cannot publish a de-quantised copy
    workers = min(train.num_workers, len(spec.features))
    steps_per_epoch = math.ceil((len(spec.features) // workers) / train.batch_size)
    ds_settings = (deepspeed_settings(train.deepspeed_config, train.use_gpu, train.batch_size, workers)
                   if train.backend == "deepspeed" else None)  # read here: workers on other nodes lack the file
    job = WorkerJob(
        name=spec.name, stack=spec.stack.model_dump(), visual_width=spec.visual_width, cache_dir=spec.cache_dir,
        start=spec.start, features=spec.features.features, labels=[str(y) for y in spec.features.labels],
        replay=spec.replay, replay_ratio=spec.replay_ratio, seed=spec.seed, threads=train.threads_per_worker,
        world_size=workers, epochs=train.epochs, batch_size=train.batch_size, lr=train.lr,
        weight_decay=train.weight_decay, warmup_fraction=train.warmup_fraction, steps_per_epoch=steps_per_epoch,
        backend=train.backend, deepspeed=ds_settings,
        # the frozen LLM runs in the projection's precision: half the memory under bf16, nothing to train
        llm_dtype=(low_precision(ds_settings) if ds_settings else None) or "float32")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.threads_per_worker},
                                     placement_strategy=train.placement_strategy),
        # storage_path: a local path or any fsspec URL (checkpoints on s3:// with storage_options)
        run_config=RunConfig(name=spec.name, **open_storage(spec.storage_url, spec.storage_options).ray_train_storage(),
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{spec.name}: training finished without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as directory:
        weights = (Path(directory) / PROJECTION_FILE).read_bytes()
    metrics = result.metrics or {}
    return FitResult(weights, float(metrics.get("loss", float("nan"))),
                     int(metrics.get("images", 0)) * workers * train.epochs, time.perf_counter() - start, dict(metrics))
