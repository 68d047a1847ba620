"""The body of a training session's Ray Train workers (session.py drives them).

Each worker loads the frozen LLM once, then runs the commands the driver posts to the session's feed, one after
another, until it is told to stop: a projection update (`Update`: a fresh optimizer, the update's epochs, a
checkpoint after each, the trained weights answered by rank 0) or a map over its shard of the rows
(`MapShards`: evaluation, with the weights it names). A command carries its rows as one Ray Dataset per rank
(features.py: read from the feature cache by Ray Data tasks, never through the driver); each rank reads its own.
So one worker group, started once, serves every task of an experiment: no second set of LLM copies for evaluation
and no start-up per task.

Kept free of model imports at module level: Ray Train's controller unpickles this function and its job (so it
imports this module) only to hand them to the workers, and importing the model package there cost about 4 s.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint

# a logger, not print: Ray Train tees a worker's print to stdout and to its log, so each line showed twice
log = logging.getLogger(__name__)

POSITION_FILE = "position.json"  # in every checkpoint: which update and epoch it ends


@dataclass(frozen=True)
class SessionJob:
    """What every worker needs for the whole session (session.py builds it)."""

    stack: dict  # ModelStack.model_dump(): no model import to unpickle it
    visual_width: int
    cache_dir: str
    threads: int
    world_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    backend: str
    deepspeed: dict | None
    llm_dtype: str


@dataclass(frozen=True)
class Update:
    """One projection update: train from `start` on the features, replaying old classes into every batch."""

    name: str  # "alignment", "task-003": unique in the session; a checkpoint of this name resumes it
    start: bytes | None  # the starting projection; None: the stack's projection_init, else a seeded fresh one
    rows: list  # per rank, a Ray Dataset of its `per_rank` rows {position, label, features} (rank_rows chose them)
    per_rank: int
    replay: Any  # ObjectRef of a replay memory's payload (or None)
    replay_ratio: float
    seed: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.per_rank / batch_size)


@dataclass(frozen=True)
class MapShards:
    """`function(gmm, matcher, features, *args)` over this worker's contiguous shard of the rows, with the
    projection `weights` loaded; the driver concatenates the answers in rank order."""

    function: Any  # a module-level function (pickled by reference)
    weights: Any  # ObjectRef of safetensors bytes
    rows: Any  # per rank, a Ray Dataset of its shard of the rows; or an ObjectRef of a small array, cut by `shard`
    args: tuple = ()
    matcher: bool = False  # whether the function needs the text matcher (free decoding)


@dataclass(frozen=True)
class Failed:
    """A map's exception on one rank, answered instead of raised: bad input is no reason to restart the worker group
    (an update's is raised: its ranks meet in collectives, and Ray Train must tear them all down)."""

    rank: int
    error: BaseException
    trace: str


def shard(count: int, world: int, rank: int) -> slice:
    """This rank's contiguous share of `count` rows, cut as np.array_split cuts (sizes differ by at most one)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_rows(count: int, world: int, rank: int, seed: int) -> np.ndarray:
    """The rows (positions, ascending) an update gives rank `rank`: a seeded permutation cut into equal shares, so
    every worker runs the same number of steps (DDP needs that) and shares never overlap; count % world rows rest."""
    per_worker = count // world
    return np.sort(np.random.default_rng(seed).permutation(count)[rank * per_worker: (rank + 1) * per_worker])


def epoch_batches(count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches over a worker's `count` rows: a permutation drawn from `rng` (seeded by update, rank and
    epoch, so a restart from epoch k draws alike), cut into batches of `batch_size`."""
    order = rng.permutation(count)
    return [order[i: i + batch_size] for i in range(0, count, batch_size)]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SessionWorker:
    """One rank's state for the whole session: the model (LLM loaded once), the matcher once asked for, and the
    checkpoint the worker group was started with (it names the update and epoch it ends)."""

    def __init__(self, job: SessionJob):
        from gmm_model import create_gmm
        from gmm_model.spec import ModelStack
        from gmm_model.stack import torch_dtype

        torch.set_num_threads(job.threads)
        self.job, self.stack = job, ModelStack.model_validate(job.stack)
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()
        self.gmm = create_gmm(self.stack, job.visual_width, job.cache_dir, dtype=torch_dtype(job.llm_dtype))
        self.gmm.to(self.device)
        self.matcher = None
        self.evaluated: tuple[str, Any] | None = None  # (sha256 of the weights, their projection): maps reuse it
        self.checkpoint = ray.train.get_checkpoint()  # set when Ray Train restored this group

    def projection(self, weights: bytes | None, seed: int):
        from gmm_model.stack import initial_projection

        torch.manual_seed(seed)  # a fresh projection is the same on every rank (DDP also broadcasts rank 0's)
        return initial_projection(self.stack, self.job.visual_width, self.gmm.llm_width, weights).to(self.device)

    def run(self, command):
        if isinstance(command, Update):
            return self.update(command)
        if isinstance(command, MapShards):
            return self.map_shards(command)
        raise TypeError(f"unknown session command {type(command).__name__}")

    def map_shards(self, command: MapShards):
        if command.matcher and self.matcher is None:
            from gmm_model import create_matcher

            self.matcher = create_matcher(self.stack)
        weights = ray.get(command.weights)
        digest = hashlib.sha256(weights).hexdigest()
        if self.evaluated is None or self.evaluated[0] != digest:  # a task's evaluation maps twice with its weights
            self.evaluated = (digest, self.projection(weights, 0))
        self.gmm.projection = self.evaluated[1]
        if isinstance(command.rows, list):
            from ..features import read_positions

            mine = read_positions(command.rows[self.rank])[2]
        else:
            rows = ray.get(command.rows)
            mine = rows[shard(len(rows), self.job.world_size, self.rank)]
        with torch.no_grad():
            return command.function(self.gmm, self.matcher, mine, *command.args)

    def update(self, update: Update) -> dict | None:
        from ..features import read_positions
        from ..replay import sample_replay
        from .backends import frozen_llm_check, gather_per_worker, make_backend, worker_memory

        job, rank, received = self.job, self.rank, time.perf_counter()
        _, mine, features = read_positions(update.rows[rank])  # this rank's rows, in position order
        if len(mine) != update.per_rank:
            raise ValueError(f"{update.name}: rank {rank} read {len(mine)} rows, expected {update.per_rank}")
        replay = ray.get(update.replay) if update.replay is not None else None
        steps_per_epoch = update.steps_per_epoch(job.batch_size)
        projection = self.projection(update.start, update.seed)
        optimizer = torch.optim.AdamW(projection.parameters(), lr=job.lr, weight_decay=job.weight_decay)
        scheduler = warmup_cosine(optimizer, steps_per_epoch * job.epochs, job.warmup_fraction)
        backend = make_backend(job.backend, projection, optimizer, scheduler, job.world_size, job.deepspeed)
        self.gmm.projection = backend.module
        parameters = frozen_llm_check(self.gmm, optimizer)
        start_epoch, last = self.restore(update.name, backend)
        first_step = last_step = None
        log_every = max(1, steps_per_epoch // 4)
        align = self.alignment(replay)
        for epoch in range(start_epoch, job.epochs):
            losses, images, epoch_start = [], 0, time.perf_counter()
            first_step = first_step or epoch_start
            rng = np.random.default_rng([update.seed, rank, epoch])  # per epoch: a restart from epoch k replays alike
            for rows in epoch_batches(len(mine), job.batch_size, rng):
                labels = [mine[i] for i in rows]
                batch = features[rows].astype(np.float32)
                replay_x, replay_y = sample_replay(replay, round(update.replay_ratio * len(labels)), rng)
                if replay_y:
                    batch, labels = np.concatenate([batch, replay_x]), labels + replay_y
                if align is not None and replay_y:
                    loss = self.aligned_loss(torch.from_numpy(batch).to(self.device), labels, replay_x, align)
                else:
                    loss = self.gmm.loss(torch.from_numpy(batch).to(self.device), labels)
                backend.step(loss)
                losses.append(loss.item())
                images += len(labels)  # new and replayed samples
                if rank == 0 and len(losses) % log_every == 0:
                    log.info("%s epoch %d/%d step %d/%d: loss %.3f", update.name, epoch + 1, job.epochs,
                             len(losses), steps_per_epoch, np.mean(losses[-log_every:]))
            last_step = time.perf_counter()
            last = {"update": update.name, "epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
                    "images": images, "epoch_seconds": last_step - epoch_start}
            save_checkpoint(last, backend, rank)
        metrics = {**last, "start_epoch": start_epoch,  # start_epoch > 0: this update resumed from a checkpoint
                   "steps_seconds": (last_step - first_step) if first_step else 0.0,
                   "setup_seconds": (first_step or time.perf_counter()) - received,
                   **parameters, **gather_per_worker({"epoch_seconds": last.get("epoch_seconds", 0.0), "pid": os.getpid(),
                                                      **worker_memory(self.device, optimizer)}, job.world_size)}
        weights = backend.full_projection_bytes()  # a collective under ZeRO: every rank takes part
        self.gmm.projection = projection
        return {"projection": weights, "metrics": metrics} if rank == 0 else None

    def alignment(self, replay: dict | None) -> dict | None:
        """Classifier alignment's fixed parts for one update: the old classes' first name tokens (the candidates of
        the LLM's posterior) and, per class, its token's index among them; None when the replay asks for none."""
        if not replay or "align" not in replay:
            return None
        from gmm_model.model import first_tokens

        tokens = first_tokens(self.gmm.label_trie(replay["classes"]))
        candidates = sorted(set(tokens))
        return {**replay["align"], "candidates": candidates, "head": torch.from_numpy(replay["align"]["head"]),
                "token_of_class": torch.tensor([candidates.index(t) for t in tokens])}

    def aligned_loss(self, visual: torch.Tensor, labels: list[str], replayed: np.ndarray, align: dict) -> torch.Tensor:
        """The answer loss plus align["weight"] * KL(ridge posterior || LLM posterior) on the replayed rows (the last
        len(replayed) of the batch), from one forward."""
        import torch.nn.functional as F

        from ..fusion import alignment_target

        loss, log_posterior = self.gmm.loss_and_class_log_posterior(visual, labels, align["candidates"])
        target = alignment_target(replayed, align["head"], align["scale"], align["token_of_class"],
                                  len(align["candidates"])).to(log_posterior.device)
        kl = F.kl_div(log_posterior[-len(replayed):], target, reduction="batchmean")
        return loss + align["weight"] * kl

    def restore(self, name: str, backend) -> tuple[int, dict]:
        """(the epoch to start from, the position of the last epoch done): from the group's checkpoint when it
        ends an epoch of this very update (a restarted worker or driver), else from the start."""
        if self.checkpoint is None:
            return 0, {}
        with self.checkpoint.as_directory() as directory:
            position = json.loads((Path(directory) / POSITION_FILE).read_text())
            if position["update"] != name:
                return 0, {}
            backend.restore(Path(directory))
        return position["epoch"] + 1, position


def save_checkpoint(position: dict, backend, rank: int) -> None:
    """Every rank writes its part of the checkpoint (if any) and takes part in the report; Ray Train merges the
    parts into one directory. Rank 0 adds the position: the update and epoch it ends."""
    with tempfile.TemporaryDirectory() as directory:
        backend.save(Path(directory), position["epoch"], rank)
        if rank == 0:
            (Path(directory) / POSITION_FILE).write_text(json.dumps(position))
        written = any(Path(directory).iterdir())
        ray.train.report(position, checkpoint=Checkpoint.from_directory(directory) if written else None)


def session_worker_loop(config: dict) -> None:
    """Ray Train worker body: `config` is {"job": SessionJob, "feed": the session's Feed actor}. Runs each command
    the feed hands out and answers it, until the feed says stop (None)."""
    worker, feed = SessionWorker(config["job"]), config["feed"]
    done = -1
    while (posted := ray.get(feed.next.remote(done))) is not None:
        done, command = posted
        try:
            answer = worker.run(command)
        except Exception as error:
            if not isinstance(command, MapShards):
                raise
            answer = Failed(worker.rank, error, traceback.format_exc())
        ray.get(feed.answer.remote(done, worker.rank, answer))
