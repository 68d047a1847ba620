"""The Ray Train worker body of one task's fit (see training.py for the fit itself).

Kept free of model imports at module level: Ray Train's controller unpickles this function and its config (so it
imports this module) only to hand them to the workers, and importing the model package there cost about 4 s of
every fit. The config carries the model stack as a plain dict for the same reason.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint

# a logger, not print: Ray Train tees a worker's print to stdout and to its log, so each line showed twice
log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from gmm_model import ModelStack, create_gmm

    from .replay import sample_replay
    from .train_backends import frozen_llm_check, gather_per_worker, make_backend, worker_memory

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    gmm = create_gmm(ModelStack.model_validate(config["stack"]), config["visual_width"], config["cache_dir"],
                     config["projection"], dtype=DTYPES[config["llm_dtype"]])
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
