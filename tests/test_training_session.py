"""The training session (cil_platform/training/session.py): one Ray Train worker group serves many projection
updates and evaluations, each exactly as a fit of its own would compute it.

The feed's protocol is tested on its own (a Ray actor, no model); the session with the real small stack on
QuickDraw features: two updates and an evaluation in the same worker processes, on rows the workers stream from
the feature cache themselves, the second update equal to the weights of the same update run alone on the same rows
held in memory (that fit checkpointing to an S3 bucket: tests/s3.py), the evaluation equal to the same code run
in this process.
"""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load as load_tensors

from cil_platform.class_stats import ClassStatistics
from cil_platform.config import ExperimentConfig
from cil_platform.evaluation import predict
from cil_platform.features import FeatureSet, feature_sets_for
from cil_platform.replay import PseudoFeatureReplay
from cil_platform.training.fit import FitSpec, fit_projection
from cil_platform.training.session import Feed, SessionSpec, TrainingSession
from cil_platform.training.worker import shard
from gmm_model import create_encoder, create_gmm
from gmm_model.classify import ClassifierStats
from gmm_model.rules import Rule

NO_STATS = ClassifierStats(None, None)  # the trie rule needs no prior and no prototypes



def refuse(gmm, matcher, rows):
    """A shard function that fails on its input, as a bad request would."""
    raise ValueError(f"refused {len(rows)} rows")


def test_shards_cut_like_array_split():
    for count in (0, 1, 5, 10, 11):
        for world in (1, 2, 3):
            expected = np.array_split(np.arange(count), world)
            assert [list(np.arange(count)[shard(count, world, r)]) for r in range(world)] == [list(e) for e in expected]


def test_the_feed_hands_out_pending_commands_and_replays_the_one_in_flight(own_ray_for_module):
    feed = Feed.remote(2)
    first = ray.get(feed.post.remote("a"))
    assert ray.get(feed.next.remote(-1)) == (first, "a")
    for rank in (1, 0):
        ray.get(feed.answer.remote(first, rank, f"a{rank}"))
    assert ray.get(feed.answers.remote(first)) == ["a0", "a1"]  # in rank order
    second = ray.get(feed.post.remote("b"))
    assert ray.get(feed.next.remote(-1)) == (second, "b")  # a restarted worker skips what is answered
    ray.get(feed.answer.remote(second, 0, "b0"))
    assert ray.get(feed.next.remote(-1)) == (second, "b")  # one rank's answer: still in flight for a restart
    waiting = feed.next.remote(second)  # a worker that ran "b" waits for the next command
    assert not ray.wait([waiting], timeout=0.5)[0]
    ray.get(feed.answer.remote(second, 1, "b1"))
    assert ray.get(feed.answers.remote(second)) == ["b0", "b1"]
    ray.get(feed.post.remote(None))
    assert ray.get(waiting) is None  # stop
    ray.kill(feed)


@pytest.fixture(scope="module")
def tasks(own_ray_for_module, tmp_path_factory):
    """Two tasks of two QuickDraw classes each, and a replay memory of the first."""
    cfg = ExperimentConfig(dataset={"kind": "quickdraw", "train_per_class": 8, "test_per_class": 3},
                           output_dir=str(tmp_path_factory.mktemp("session")))
    encoder = create_encoder(cfg.stack)
    streamed, streamed_test = feature_sets_for(cfg, encoder.identity, ["apple", "cat", "dog", "fish"])
    assert isinstance(streamed, FeatureSet) and not hasattr(streamed, "features")  # the driver holds no features
    stats = ClassStatistics()
    stats.learn(streamed.select(["apple", "cat"]))
    return cfg, encoder.width, streamed, streamed_test, PseudoFeatureReplay(stats).payload()


def test_one_session_refuses_bad_input_trains_and_evaluates_as_separate_fits_would(tasks, tmp_path, s3_bucket):
    cfg, width, train, test, replay = tasks  # streamed from the cache
    train_cfg = cfg.train.model_copy(update={"batch_size": 4, "num_workers": 2, "epochs": 2})
    first_task, second_task = train.select(["apple", "cat"]), train.select(["dog", "fish"])
    spec = SessionSpec(name="experiment", stack=cfg.stack, visual_width=width, cache_dir=cfg.cache_dir,
                       train=train_cfg, storage_url=str(tmp_path / "session"))
    classes = ["apple", "cat", "dog", "fish"]
    with TrainingSession(spec) as session:
        with pytest.raises(ValueError, match="1 training images cannot be shared by 2 workers"):
            session.fit("task-000", first_task.subset(slice(0, 1)), None, seed=1)  # refused before any work
        first = session.fit("task-000", first_task, None, seed=1)
        second = session.fit("task-001", second_task, first.projection, seed=2,
                             replay=replay, replay_ratio=1.0)
        evaluated = session.map_shards(predict, second.projection, test, classes, 5, [Rule.TRIE], NO_STATS)
        with pytest.raises(ValueError, match="refused 3 rows"):  # bad input: the worker's error, no restart
            session.map_shards(refuse, second.projection, test.to_table().features[:6])
        after = session.fit("task-002", first_task.subset(slice(0, 4)), None, seed=3)
    with pytest.raises(RuntimeError, match="closed"):
        session.fit("task-003", first_task, None, seed=0)
    # the same worker processes all along: no start-up per update, and no restart for the refused input
    assert first.metrics["pid_per_worker"] == second.metrics["pid_per_worker"] == after.metrics["pid_per_worker"]
    assert second.metrics["start_epoch"] == 0 and second.images == 2 * (16 // 2) * 2 * 2  # new + replayed, 2 epochs
    in_memory = second_task.to_table()  # the same rows, through the object store instead of the cache
    alone = fit_projection(FitSpec(name="task-001", features=in_memory, start=first.projection, stack=cfg.stack,
                                   visual_width=width, cache_dir=cfg.cache_dir, train=train_cfg,
                                   storage_url=s3_bucket.url("alone"), storage_options=s3_bucket.options,
                                   seed=2, replay=replay, replay_ratio=1.0))
    saved = sorted(o for o in s3_bucket.keys("alone")
                   if o.startswith("task-001/") and o.endswith("/projection.safetensors"))
    assert len(saved) == 2  # the fit's checkpoints, one per epoch, uploaded to the bucket; the result is the last
    bucket = s3_bucket.storage("alone")
    assert bucket.fs.cat_file(f"{bucket.path}/{saved[-1]}") == alone.projection
    a, b = load_tensors(second.projection), load_tensors(alone.projection)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (load_tensors(first.projection)["weight"] != a["weight"]).any()
    # the workers' shards of the evaluation, in rank order, are this process's labels of the whole test set
    gmm = create_gmm(cfg.stack, width, cfg.cache_dir, second.projection)
    with torch.no_grad():
        here = predict(gmm, None, test.to_table().features, classes, 5, [Rule.TRIE], NO_STATS)[Rule.TRIE]
    assert np.concatenate([part[Rule.TRIE] for part in evaluated]).tolist() == here.tolist()
    assert len(evaluated) == 2 and all(len(part[Rule.TRIE]) for part in evaluated)
    assert all(part[Rule.TRIE].dtype == np.int32 for part in evaluated)  # compact answers: class indices
