"""One Ray Train fit per task: the projection update on sharded cached features.

The task's cached features travel with the fit (Ray's object store) and each worker trains on its
own equal shard of a seeded permutation. (Feeding them through a Ray Dataset instead costs two more
actor processes per fit, several seconds each on a small node, for data that fits in memory.) Each
worker loads the frozen LLM itself (a fast safetensors read once de-quantised), wraps only the
projection for data parallelism (train.backend: DDP, or DeepSpeed with the ZeRO stage and precision
of its JSON config; see train_backends.py), and draws replayed samples of old classes from the
memory's payload into every batch. A fresh AdamW with linear warm-up and cosine decay is created per
task. A checkpoint (projection plus the backend's optimizer/scheduler state and the epoch) is
reported after every epoch, so a restarted worker group resumes from it.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gmm_model import ModelStack, create_gmm
from gmm_model.llm import prepare_llm

from .deepspeed_config import deepspeed_settings, low_precision
from .features import FeatureTable
from .replay import sample_replay
from .storage import open_storage
from .train_backends import PROJECTION_FILE, frozen_llm_check, gather_per_worker, make_backend, worker_memory

# a logger, not print: Ray Train tees a worker's print to stdout and to its log, so each line showed twice
log = logging.getLogger(__name__)


@dataclass
class TaskTrainingResult:
    projection: bytes
    loss: float
    images: int  # samples processed, new and replayed (all epochs, all workers)
    seconds: float
    metrics: dict = field(default_factory=dict)  # rank 0's last report: loss, memory per worker, ...


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _restore(checkpoint: Checkpoint | None, backend) -> int:
    """Load the last reported state; returns the epoch to start from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return backend.restore(Path(directory))


def _report(epoch: int, metrics: dict, backend, rank: int) -> None:
    """Every rank writes its part of the checkpoint (if any); Ray Train merges them into one directory."""
    with tempfile.TemporaryDirectory() as directory:
        backend.save(Path(directory), epoch, rank)
        written = any(Path(directory).iterdir())
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if written else None)


def shard_batches(count: int, world: int, rank: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """This worker's batches of one epoch: a seeded permutation cut into equal shards, so every
    worker runs the same number of steps (DDP needs that) and shards never overlap."""
    order = np.random.default_rng(seed).permutation(count)
    per_worker = count // world
    mine = order[rank * per_worker: (rank + 1) * per_worker]
    return [mine[i: i + batch_size] for i in range(0, per_worker, batch_size)]


def train_task_loop(config: dict) -> None:
    """Ray Train worker body for one task."""
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    gmm = create_gmm(config["stack"], config["visual_width"], config["cache_dir"], config["projection"],
                     dtype=config["llm_dtype"])
    gmm.to(device)
    projection = gmm.projection
    optimizer = torch.optim.AdamW(projection.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = warmup_cosine(optimizer, config["steps_per_epoch"] * config["epochs"], config["warmup_fraction"])
    backend = make_backend(config["backend"], projection, optimizer, scheduler, config["world_size"],
                           config["deepspeed"])
    gmm.projection = backend.module
    parameters = frozen_llm_check(gmm, optimizer)
    start_epoch = _restore(ray.train.get_checkpoint(), backend)
    features_all, labels_all = config["features"], config["labels"]
    world = config["world_size"]
    for epoch in range(start_epoch, config["epochs"]):
        losses, images, epoch_start = [], 0, time.perf_counter()
        rng = np.random.default_rng([config["seed"], rank, epoch])  # per epoch: a restart from epoch k replays alike
        for rows in shard_batches(len(labels_all), world, rank, config["batch_size"], config["seed"] + epoch):
            labels = [labels_all[i] for i in rows]
            features = features_all[rows].astype(np.float32)
            replay_x, replay_y = sample_replay(config["replay"], round(config["replay_ratio"] * len(labels)), rng)
            if replay_y:
                features, labels = np.concatenate([features, replay_x]), labels + replay_y
            loss = gmm.loss(torch.from_numpy(features), labels)
            backend.step(loss)
            losses.append(loss.item())
            images += len(labels)  # new and replayed samples
            if rank == 0 and len(losses) % config["log_every"] == 0:
                log.info("task %s epoch %d/%d step %d/%d: loss %.3f", config["task"], epoch + 1, config["epochs"],
                         len(losses), config["steps_per_epoch"], np.mean(losses[-config["log_every"]:]))
        metrics = {"epoch": epoch, "start_epoch": start_epoch,  # start_epoch > 0: this worker group was restored
                   "loss": float(np.mean(losses)) if losses else float("nan"), "images": images,
                   **parameters, **gather_per_worker({  # epoch_seconds: the steps alone, no start-up or checkpoint
                       "epoch_seconds": time.perf_counter() - epoch_start, **worker_memory(device, optimizer)}, world)}
        _report(epoch, metrics, backend, rank)


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
        "stack": stack, "visual_width": visual_width, "cache_dir": cache_dir, "projection": projection,
        "replay": replay_payload, "replay_ratio": replay_ratio, "seed": seed + 1000 * (task_index + 1),  # task -1 is stage-1 alignment
        "threads": train_cfg.threads_per_worker, "world_size": workers, "epochs": train_cfg.epochs,
        "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay,
        "warmup_fraction": train_cfg.warmup_fraction, "steps_per_epoch": steps_per_epoch,
        "features": features.features, "labels": [str(y) for y in features.labels],
        "task": task_index, "log_every": max(1, steps_per_epoch // 4),
        "backend": train_cfg.backend, "deepspeed": ds_settings,
        # the frozen LLM runs in the projection's precision: half the memory under bf16, nothing to train
        "llm_dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}[precision],
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
