"""Discriminative baselines on synthetic, well-separated frozen features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cil_platform.baselines import LinearHead, NearestClassMean, make_baseline
from cil_platform.class_stats import ClassStatistics
from cil_platform.features import FeatureTable

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices (tests/conftest.py)

T, D = 4, 8
TASKS = [["ant", "bee"], ["cat", "dog"]]
CLASSES = [c for task in TASKS for c in task]


def synthetic(per_class: int, seed: int, classes=CLASSES) -> FeatureTable:
    """Class k lives around 3 * e_k in every token, with small noise: linearly separable by far."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for name in classes:
        k = CLASSES.index(name)
        centre = np.zeros(D)
        centre[k] = 3.0
        feats.append(centre + 0.3 * rng.standard_normal((per_class, T, D)))
        labels += [name] * per_class
    keys = [f"{seed:08x}{i:032x}" for i in range(len(labels))]
    return FeatureTable(np.concatenate(feats).astype(np.float16), np.asarray(labels, dtype=object),
                        np.asarray(keys, dtype=object))


@pytest.fixture(scope="module")
def data():
    train = synthetic(20, seed=1)
    test = synthetic(10, seed=2)
    return train, test


@pytest.fixture(scope="module")
def heads(data):
    """(joint head, its predictions per task), (sequential head, its predictions per task)."""
    train, test = data
    joint, sequential = LinearHead(joint=True, seed=0), LinearHead(joint=False, seed=0)
    return (joint, run_tasks(joint, train, test)), (sequential, run_tasks(sequential, train, test))


def accuracy(predicted: list[str], truth, classes=None) -> float:
    truth = [str(t) for t in truth]
    pairs = [(p, t) for p, t in zip(predicted, truth) if classes is None or t in classes]
    return sum(p == t for p, t in pairs) / len(pairs)


def run_tasks(method, train: FeatureTable, test: FeatureTable) -> list[list[str]]:
    """Learn task by task on the new classes' data only; predictions on all seen classes after each."""
    predictions, seen = [], []
    for task in TASKS:
        seen = seen + task
        method.learn(train.select(task), seen)
        predictions.append(method.predict(test.select(seen), seen))
    return predictions


def test_pooled_averages_tokens_and_normalises(data):
    train, _ = data
    x = train.pooled
    assert x.shape == (len(train), D) and x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=1), torch.ones(len(train)))
    expected = train.features[0].astype(np.float32).mean(0)
    torch.testing.assert_close(x[0], torch.from_numpy(expected / np.linalg.norm(expected)))


class LearningStats:
    """NCM reads the class statistics the experiment learns every task: this stand-in for the experiment learns
    them before NCM is asked (the order run_task uses)."""

    def __init__(self, ncm: NearestClassMean):
        self.ncm = ncm

    def learn(self, train, seen):
        self.ncm.stats.learn(train)
        self.ncm.learn(train, seen)

    def predict(self, test, seen):
        return self.ncm.predict(test, seen)


def test_ncm_is_perfect_on_separated_classes_and_limited_to_seen(data):
    train, test = data
    ncm = make_baseline("ncm", ClassStatistics())
    assert isinstance(ncm, NearestClassMean) and ncm.name == "ncm"
    predictions = run_tasks(LearningStats(ncm), train, test)
    assert accuracy(predictions[0], test.select(TASKS[0]).labels) == 1.0
    assert accuracy(predictions[1], test.labels) == 1.0
    assert len(predictions[1]) == len(test)
    assert set(ncm.stats.prototype) == set(CLASSES)
    for name, prototype in ncm.stats.prototype.items():
        assert prototype.shape == (D,)
        assert abs(np.linalg.norm(prototype) - 1) < 1e-5
        assert prototype.argmax() == CLASSES.index(name)
    assert ncm.memory_bytes == len(CLASSES) * D * 4
    # prediction is restricted to the classes passed as seen
    only = ncm.predict(test, ["ant", "bee"])
    assert set(only) <= {"ant", "bee"}


def test_joint_head_is_near_perfect_on_all_seen_classes(data, heads):
    train, test = data
    (joint, predictions), _ = heads
    made = make_baseline("joint", ClassStatistics(), seed=0)
    assert isinstance(made, LinearHead) and made.joint and made.name == joint.name == "joint"
    assert accuracy(predictions[0], test.select(TASKS[0]).labels) >= 0.95
    assert accuracy(predictions[1], test.labels) >= 0.95
    assert joint.weight.shape == (len(CLASSES), D) and joint.bias.shape == (len(CLASSES),)
    # joint keeps every task's training features: that is its memory
    assert joint.memory_bytes == train.features.nbytes == len(train) * T * D * 2


def test_sequential_head_forgets_the_first_task(data, heads):
    _, test = data
    (_, joint_predictions), (sequential, sequential_predictions) = heads
    made = make_baseline("linear_sequential", ClassStatistics())
    assert isinstance(made, LinearHead) and not made.joint
    assert made.name == sequential.name == "linear_sequential"

    # after task 1 both heads have seen the same data: both are (near) perfect
    assert accuracy(sequential_predictions[0], test.select(TASKS[0]).labels) >= 0.95

    old, new = TASKS[0], TASKS[1]
    seen_test = test.select(CLASSES)
    joint_old = accuracy(joint_predictions[1], seen_test.labels, old)
    sequential_old = accuracy(sequential_predictions[1], seen_test.labels, old)
    sequential_new = accuracy(sequential_predictions[1], seen_test.labels, new)
    assert sequential_new >= 0.95  # it learned the new task
    assert joint_old >= sequential_old
    assert sequential_old < 0.9  # ...and forgot the old one, at least partly
    assert sequential.memory_bytes == 0  # no data kept
    assert sequential.weight.shape == (len(CLASSES), D)


def test_linear_head_is_deterministic_per_seed(data):
    train, test = data
    a, b = LinearHead(joint=True, seed=3, epochs=3), LinearHead(joint=True, seed=3, epochs=3)
    for head in (a, b):
        head.learn(train.select(TASKS[0]), TASKS[0])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


class CountedReads(FeatureTable):
    """A table that counts the passes over its rows (over a FeatureSet, each is a Ray Data read of the cache)."""

    reads = 0

    def batches(self, size: int = 1024):
        self.reads += 1
        yield from super().batches(size)


def test_all_baselines_together_read_a_tasks_rows_and_its_test_rows_once(data):
    train, test = data
    stats = ClassStatistics()
    stats.learn(train)  # NCM's prototypes: the experiment learns them (run_task)
    task, seen_test = (CountedReads(t.features, t.labels, t.keys) for t in (train, test))
    for name in ("ncm", "linear_sequential", "joint", "ridge", "lda"):  # ranpac embeds as ridge does
        baseline = make_baseline(name, stats, seed=0)
        baseline.learn(task, CLASSES)
        predicted = baseline.predict(seen_test, CLASSES)
        assert accuracy(predicted, seen_test.labels) > 0.9, name  # separable: each still learns from the same rows
    assert task.reads == seen_test.reads == 1


def test_unknown_baseline_is_a_value_error():
    with pytest.raises(ValueError, match="unknown baseline 'nope'"):
        make_baseline("nope", ClassStatistics())
