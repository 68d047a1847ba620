"""One Ray Train fit per task: the projection update on sharded cached features.

The task's cached features travel with the fit (Ray's object store) and each worker trains on its
own equal shard of a seeded permutation. (Feeding them through a Ray Dataset instead costs two more
actor processes per fit, several seconds each on a small node, for data that fits in memory.) Each
worker loads the frozen LLM itself (a fast safetensors read once de-quantised), wraps only the
projection for data parallelism (train.backend: DDP, or DeepSpeed with the ZeRO stage and precision
of its JSON config; see train_backends.py), and draws replayed samples of old classes from the
memory's payload into every batch. A fresh AdamW with linear warm-up and cosine decay is created per
task. A checkpoint (projection plus the backend's optimizer/scheduler state and the epoch) is
reported after every epoch, so a restarted worker group resumes from it. The worker body is
train_worker.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gmm_model import ModelStack
from gmm_model.llm import prepare_llm

from .deepspeed_config import deepspeed_settings, low_precision
from .features import FeatureTable
from .storage import open_storage
from .train_backends import PROJECTION_FILE
from .train_worker import train_task_loop


@dataclass
class TaskTrainingResult:
    projection: bytes
    loss: float
    images: int  # samples processed, new and replayed (all epochs, all workers)
    seconds: float
    metrics: dict = field(default_factory=dict)  # rank 0's last report: loss, memory per worker, ...


def train_task(task_index: int, features: FeatureTable, projection: bytes | None, replay_payload: dict | None,
               stack: ModelStack, visual_width: int, cache_dir: str, train_cfg, replay_ratio: float,
               storage_path: str, seed: int, max_failures: int = 1,
               storage_options: dict | None = None,
               worker_loop: Callable[[dict], None] = train_task_loop) -> TaskTrainingResult:
    """Run the projection update of one task as one TorchTrainer fit; returns the trained weights.
    (`worker_loop` is the worker body; tests wrap train_task_loop to inject a failure.)"""
    if len(features) == 0:
        raise ValueError(f"task {task_index} has no training images")
    start = time.perf_counter()
    prepare_llm(stack.llm, cache_dir)  # here, once: workers of rank > 0 cannot publish a de-quantised copy
    workers = min(train_cfg.num_workers, len(features))
    steps_per_epoch = math.ceil((len(features) // workers) / train_cfg.batch_size)
    ds_settings = (deepspeed_settings(train_cfg.deepspeed_config, train_cfg.use_gpu, train_cfg.batch_size, workers)
                   if train_cfg.backend == "deepspeed" else None)  # read here: workers on other nodes lack the file
    precision = low_precision(ds_settings) if ds_settings else None
    loop_config = {
        "stack": stack.model_dump(), "visual_width": visual_width, "cache_dir": cache_dir, "projection": projection,
        "replay": replay_payload, "replay_ratio": replay_ratio, "seed": seed + 1000 * (task_index + 1),  # task -1 is stage-1 alignment
        "threads": train_cfg.threads_per_worker, "world_size": workers, "epochs": train_cfg.epochs,
        "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay,
        "warmup_fraction": train_cfg.warmup_fraction, "steps_per_epoch": steps_per_epoch,
        "features": features.features, "labels": [str(y) for y in features.labels],
        "task": task_index, "log_every": max(1, steps_per_epoch // 4),
        "backend": train_cfg.backend, "deepspeed": ds_settings,
        # the frozen LLM runs in the projection's precision: half the memory under bf16, nothing to train
        "llm_dtype": {"bf16": "bfloat16", "fp16": "float16", None: "float32"}[precision],
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.threads_per_worker},
                                     placement_strategy=train_cfg.placement_strategy),
        # storage_path: a local path or any fsspec URL (checkpoints on s3:// with storage_options)
        run_config=RunConfig(name=f"task-{task_index:03d}",
                             **open_storage(storage_path, storage_options).ray_train_storage(),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"task {task_index}: training finished without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as directory:
        weights = (Path(directory) / PROJECTION_FILE).read_bytes()
    metrics = result.metrics or {}
    return TaskTrainingResult(weights, float(metrics.get("loss", float("nan"))),
                              int(metrics.get("images", 0)) * workers * train_cfg.epochs, time.perf_counter() - start,
                              dict(metrics))
