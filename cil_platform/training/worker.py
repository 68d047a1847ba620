"""The Ray Train worker body of one projection update (fit.py runs the fit itself).

Kept free of model imports at module level: Ray Train's controller unpickles this function and its job (so it
imports this module) only to hand them to the workers, and importing the model package there cost about 4 s of
every fit. The job carries the model stack as a plain dict for the same reason.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint

# a logger, not print: Ray Train tees a worker's print to stdout and to its log, so each line showed twice
log = logging.getLogger(__name__)



@dataclass(frozen=True)
class WorkerJob:
    """What every worker of one fit needs (fit.py builds it from a FitSpec)."""

    name: str  # "alignment", "task-003": for log lines
    stack: dict  # ModelStack.model_dump(): no model import to unpickle it
    visual_width: int
    cache_dir: str
    start: bytes | None  # starting projection
    features: np.ndarray  # (N, T, D) float16
    labels: list[str]
    replay: dict | None
    replay_ratio: float
    seed: int
    threads: int
    world_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    steps_per_epoch: int
    backend: str
    deepspeed: dict | None
    llm_dtype: str

    @property
    def log_every(self) -> int:
        return max(1, self.steps_per_epoch // 4)


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


def fit_worker_loop(config: dict) -> None:
    """Ray Train worker body: `config` is {"job": WorkerJob}."""
    from gmm_model import create_gmm
    from gmm_model.spec import ModelStack
    from gmm_model.stack import torch_dtype

    from ..replay import sample_replay
    from .backends import frozen_llm_check, gather_per_worker, make_backend, worker_memory

    job: WorkerJob = config["job"]
    torch.set_num_threads(job.threads)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(job.seed)
    device = ray.train.torch.get_device()
    gmm = create_gmm(ModelStack.model_validate(job.stack), job.visual_width, job.cache_dir, job.start,
                     dtype=torch_dtype(job.llm_dtype))
    gmm.to(device)
    projection = gmm.projection
    optimizer = torch.optim.AdamW(projection.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    scheduler = warmup_cosine(optimizer, job.steps_per_epoch * job.epochs, job.warmup_fraction)
    backend = make_backend(job.backend, projection, optimizer, scheduler, job.world_size, job.deepspeed)
    gmm.projection = backend.module
    parameters = frozen_llm_check(gmm, optimizer)
    start_epoch = _restore(ray.train.get_checkpoint(), backend)
    for epoch in range(start_epoch, job.epochs):
        losses, images, epoch_start = [], 0, time.perf_counter()
        rng = np.random.default_rng([job.seed, rank, epoch])  # per epoch: a restart from epoch k replays alike
        for rows in shard_batches(len(job.labels), job.world_size, rank, job.batch_size, job.seed + epoch):
            labels = [job.labels[i] for i in rows]
            features = job.features[rows].astype(np.float32)
            replay_x, replay_y = sample_replay(job.replay, round(job.replay_ratio * len(labels)), rng)
            if replay_y:
                features, labels = np.concatenate([features, replay_x]), labels + replay_y
            loss = gmm.loss(torch.from_numpy(features), labels)
            backend.step(loss)
            losses.append(loss.item())
            images += len(labels)  # new and replayed samples
            if rank == 0 and len(losses) % job.log_every == 0:
                log.info("%s epoch %d/%d step %d/%d: loss %.3f", job.name, epoch + 1, job.epochs,
                         len(losses), job.steps_per_epoch, np.mean(losses[-job.log_every:]))
        metrics = {"epoch": epoch, "start_epoch": start_epoch,  # start_epoch > 0: this worker group was restored
                   "loss": float(np.mean(losses)) if losses else float("nan"), "images": images,
                   **parameters, **gather_per_worker({  # epoch_seconds: the steps alone, no start-up or checkpoint
                       "epoch_seconds": time.perf_counter() - epoch_start, **worker_memory(device, optimizer)}, job.world_size)}
        _report(epoch, metrics, backend, rank)
