"""A training session: one Ray Train fit that serves a whole experiment, started once.

Starting a TorchTrainer fit costs tens of seconds (controller, worker group, imports, loading the frozen LLM) and a
task trains for about as long, so a fit per task spent half the machine on start-ups. A session starts the worker
group once; the driver then posts commands to a small feed actor and waits for the answers:

    with TrainingSession(SessionSpec(...)) as session:
        trained = session.fit("task-000", train_rows, start=None, seed=1000)   # -> FitResult
        labels = session.map_shards(predict, trained.projection, test_rows, ...)  # evaluation on the same workers

Rows are a FeatureSet (streamed from the feature cache) or a FeatureTable (in memory): either hands each rank its
own Ray Dataset (`rows.dataset(positions)`), which the rank reads itself, so the driver posts row positions, not
features. The experiment's one fit cannot take `datasets=` (fixed when the trainer starts, and the session starts
once for every task): each command carries its rows instead (docs/data_plane.md).

Each worker (worker.py) runs the commands in order. An update reports a Ray Train checkpoint after every epoch
whose position file names the update and epoch, so Ray Train's own restore covers a killed worker (the group
restarts, takes the pending command again and resumes the update from its last epoch) and a killed driver (the
next session of the same name under the same storage path restores the newest checkpoint; an update of that name
resumes there, any other starts fresh). Answers are idempotent: a command re-run after a restart answers the same.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gmm_model.llm import prepare_llm
from gmm_model.spec import ModelStack

from ..storage import open_storage
from .config import TrainConfig
from .deepspeed_config import deepspeed_settings, low_precision
from .worker import Failed, MapShards, SessionJob, Update, rank_rows, session_worker_loop, shard

log = logging.getLogger(__name__)

_COLLECTED = object()  # an answered command whose answers the driver has taken


@ray.remote(num_cpus=0)
class Feed:
    """The driver's commands to the workers and their answers. A command is pending until every rank has answered
    it; a worker asking for work gets the first pending command after the last it ran (a restarted worker, which
    ran none, gets the one in flight). None is the stop command."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.commands: list[Any] = []
        self.replies: list[dict | object] = []
        self.changed = asyncio.Condition()

    async def post(self, command) -> int:
        async with self.changed:
            self.commands.append(command)
            self.replies.append({})
            self.changed.notify_all()
            return len(self.commands) - 1

    def _pending(self, after: int) -> int | None:
        for index in range(after + 1, len(self.commands)):
            replies = self.replies[index]
            if self.commands[index] is None or (replies is not _COLLECTED and len(replies) < self.world):
                return index
        return None

    async def next(self, after: int):
        async with self.changed:
            await self.changed.wait_for(lambda: self._pending(after) is not None)
            index = self._pending(after)
            return None if self.commands[index] is None else (index, self.commands[index])

    async def answer(self, index: int, rank: int, value) -> None:
        async with self.changed:
            if self.replies[index] is not _COLLECTED:
                self.replies[index][rank] = value
            self.changed.notify_all()

    async def answers(self, index: int) -> list:
        """Every rank's answer to command `index`, in rank order (once: the command and answers are then dropped)."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.replies[index]) >= self.world)
            replies, self.replies[index], self.commands[index] = self.replies[index], _COLLECTED, _COLLECTED
            return [replies[rank] for rank in range(self.world)]


@dataclass(frozen=True)
class SessionSpec:
    """What stays fixed for a session. `name` is the Ray Train run name under `storage_url` ("experiment",
    "alignment"): a session of the same name there restores its newest checkpoint."""

    name: str
    stack: ModelStack
    visual_width: int
    cache_dir: str
    train: TrainConfig
    storage_url: str
    storage_options: dict | None = None
    max_failures: int = 1


@dataclass
class FitResult:
    projection: bytes
    loss: float
    images: int  # samples processed, new and replayed (all epochs, all workers)
    seconds: float  # on the driver: from posting the update to holding its weights
    metrics: dict = field(default_factory=dict)  # rank 0's: loss, start_epoch, setup/steps seconds, memory, ...


class TrainingSession:
    """The driver's side of a session (see the module docstring). `worker_loop` is the worker body; tests wrap
    session_worker_loop to inject a failure."""

    POLL_S = 1.0  # how often a wait checks that the fit is still running

    def __init__(self, spec: SessionSpec, worker_loop: Callable[[dict], None] = session_worker_loop):
        train = spec.train
        prepare_llm(spec.stack.llm, spec.cache_dir)  # here, once: workers of rank > 0 cannot publish a de-quantised copy
        self.spec, self.world_size = spec, train.num_workers
        ds_settings = (deepspeed_settings(train.deepspeed_config, train.use_gpu, train.batch_size, self.world_size)
                       if train.backend == "deepspeed" else None)  # read here: workers on other nodes lack the file
        job = SessionJob(
            stack=spec.stack.model_dump(), visual_width=spec.visual_width, cache_dir=spec.cache_dir,
            threads=train.threads_per_worker, world_size=self.world_size, epochs=train.epochs,
            batch_size=train.batch_size, lr=train.lr, weight_decay=train.weight_decay,
            warmup_fraction=train.warmup_fraction, backend=train.backend, deepspeed=ds_settings,
            # the frozen LLM runs in the projection's precision: half the memory under bf16, nothing to train
            llm_dtype=(low_precision(ds_settings) if ds_settings else None) or "float32")
        self.feed = Feed.remote(self.world_size)
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"job": job, "feed": self.feed},
            scaling_config=ScalingConfig(num_workers=self.world_size, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.threads_per_worker},
                                         placement_strategy=train.placement_strategy),
            # storage_path: a local path or any fsspec URL (checkpoints on s3:// with storage_options)
            run_config=RunConfig(name=spec.name,
                                 **open_storage(spec.storage_url, spec.storage_options).ray_train_storage(),
                                 failure_config=FailureConfig(max_failures=spec.max_failures)),
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"session-{spec.name}")
        self._fit: Future = self._pool.submit(trainer.fit)  # blocks until the workers are told to stop
        self._closed = False

    def fit(self, name: str, rows, start: bytes | None, seed: int,
            replay: dict | None = None, replay_ratio: float = 0.0) -> FitResult:
        """Train the projection from `start` on `rows` (a FeatureSet or FeatureTable), replaying from the memory
        payload `replay`; returns the trained weights once rank 0 has them. Rank r trains on rank_rows(..., r, seed)."""
        if len(rows) < self.world_size:
            raise ValueError(f"{name}: {len(rows)} training images cannot be shared by {self.world_size} workers")
        posted = time.perf_counter()
        shares = [rank_rows(len(rows), self.world_size, rank, seed) for rank in range(self.world_size)]
        update = Update(name=name, start=start, rows=[rows.dataset(share) for share in shares],
                        per_rank=len(shares[0]), replay=ray.put(replay) if replay is not None else None,
                        replay_ratio=replay_ratio, seed=seed)
        answer = self._run(update)[0]
        metrics, train = answer["metrics"], self.spec.train
        return FitResult(answer["projection"], float(metrics["loss"]),
                         int(metrics["images"]) * self.world_size * train.epochs, time.perf_counter() - posted,
                         metrics)

    def map_shards(self, function: Callable, weights: bytes, rows, *args, matcher: bool = False) -> list:
        """`function(gmm, matcher, features, *args)` on every worker, with the projection `weights`; the answers in
        rank order (rank r holds the r-th contiguous shard of `rows`: a FeatureSet or FeatureTable, each rank reading
        its own shard; or a small array, such as the class means, through the object store)."""
        if isinstance(rows, np.ndarray):
            shards = ray.put(rows)
        else:
            shards = [rows.dataset(np.arange(len(rows))[shard(len(rows), self.world_size, r)])
                      for r in range(self.world_size)]
        return self._run(MapShards(function, ray.put(weights), shards, args, matcher))

    def _run(self, command) -> list:
        if self._closed:
            raise RuntimeError(f"training session {self.spec.name} is closed")
        index = ray.get(self.feed.post.remote(command))
        pending = self.feed.answers.remote(index)
        while not ray.wait([pending], timeout=self.POLL_S)[0]:
            if self._fit.done():  # the worker group failed for good (or ended): its error says why
                self._fit.result()
                raise RuntimeError(f"training session {self.spec.name} ended before answering")
        answers = ray.get(pending)
        for answer in answers:
            if isinstance(answer, Failed):  # the worker's own exception, with where it was raised
                answer.error.add_note(f"raised on session worker {answer.rank}:\n{answer.trace}")
                raise answer.error
        return answers

    def close(self) -> None:
        """Tell the workers to stop and wait for the fit to end. A session that already failed raised its error
        from the call that found it; closing it only logs it."""
        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self.feed.post.remote(None))
            self._fit.result()
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.warning("training session %s ended with an error: %s", self.spec.name, error)
        finally:
            self._pool.shutdown(wait=False)
            ray.kill(self.feed)

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
