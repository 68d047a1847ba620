"""Forgetting control: pseudo-feature statistics, exemplar memory with a shrinking budget, herding, sampling."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cil_platform.features import FeatureTable
from cil_platform.replay import (ExemplarMemory, NoReplay, PseudoFeatureReplay, herding_order, make_memory, pooled,
                                 sample_replay)

T, D = 2, 3


def table(per_class: dict[str, np.ndarray]) -> FeatureTable:
    features = np.concatenate(list(per_class.values())).astype(np.float16)
    labels = np.asarray([name for name, f in per_class.items() for _ in range(len(f))], dtype=object)
    keys = np.asarray([f"{i:040x}" for i in range(len(labels))], dtype=object)
    return FeatureTable(features, labels, keys)


def blob(rng, n: int, centre: float) -> np.ndarray:
    return (centre + rng.standard_normal((n, T, D))).astype(np.float16)


def test_pooled_flattens_tokens_to_float32():
    x = np.arange(12, dtype=np.float16).reshape(2, 2, 3)
    out = pooled(x)
    assert out.shape == (2, 6) and out.dtype == np.float32
    assert out[1].tolist() == [6, 7, 8, 9, 10, 11]


def test_pseudo_stats_are_per_class_per_token_mean_and_std():
    a = np.array([[[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [4, 7, 6]]], dtype=np.float16)
    b = np.array([[[10, 10, 10], [0, 0, 0]]], dtype=np.float16)
    memory = PseudoFeatureReplay()
    memory.update(table({"cat": a, "dog": b}))
    mean, std = memory.stats["cat"]
    assert mean.shape == std.shape == (T, D) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, [[2, 2, 2], [4, 6, 6]])
    np.testing.assert_allclose(std, [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(memory.stats["dog"][0], b[0])
    np.testing.assert_allclose(memory.stats["dog"][1], np.zeros((T, D)))
    assert memory.nbytes == 2 * 2 * T * D * 4  # two classes x (mean + std) x float32

    payload = memory.payload()
    assert payload["mode"] == "pseudo"
    assert payload["classes"] == ["cat", "dog"]
    assert payload["mean"].shape == payload["std"].shape == (2, T, D)
    np.testing.assert_allclose(payload["mean"][1], b[0])

    memory.update(table({"eel": a[:1]}))  # a later task adds classes, keeps the old ones
    assert memory.payload()["classes"] == ["cat", "dog", "eel"]
    assert memory.nbytes == 3 * 2 * T * D * 4


def test_class_means_are_the_pseudo_statistics_means_and_survive_a_state_round_trip():
    """The prior's class means and the replay Gaussians come from the same per-class statistics."""
    from cil_platform.evaluation import ClassMeans

    rng = np.random.default_rng(1)
    interleaved = table({"cat": blob(rng, 3, 0.0), "dog": blob(rng, 2, 5.0)})
    order = np.array([0, 3, 1, 4, 2])  # classes interleaved: dog's rows are not contiguous
    interleaved = FeatureTable(interleaved.features[order], interleaved.labels[order], interleaved.keys[order])
    means, replay = ClassMeans(), PseudoFeatureReplay()
    means.learn(interleaved)
    replay.update(interleaved)
    assert list(means.means) == list(replay.stats) == ["cat", "dog"]
    for name in ("cat", "dog"):
        np.testing.assert_array_equal(means.means[name], replay.stats[name][0])
        rows = interleaved.features[interleaved.labels == name].astype(np.float32)
        np.testing.assert_allclose(means.means[name], rows.mean(0), rtol=1e-6)
    assert means.matrix(["dog", "cat"]).shape == (2, T, D)
    np.testing.assert_array_equal(means.matrix(["dog", "cat"])[0], means.means["dog"])
    restored = ClassMeans()
    restored.load_state_dict(means.state_dict())
    np.testing.assert_array_equal(restored.matrix(["cat", "dog"]), means.matrix(["cat", "dog"]))
    assert restored.memory_bytes == means.memory_bytes == 2 * T * D * 4


def test_empty_memories_have_no_payload_and_no_bytes():
    for memory in (NoReplay(), PseudoFeatureReplay(), ExemplarMemory(10)):
        assert memory.payload() is None
        assert memory.nbytes == 0
    none = NoReplay()
    none.update(table({"cat": np.ones((2, T, D))}))
    assert none.payload() is None and none.nbytes == 0


def test_exemplar_budget_is_shared_evenly_as_classes_arrive():
    rng = np.random.default_rng(0)
    memory = ExemplarMemory(budget=6)
    memory.update(table({"a": blob(rng, 5, 0), "b": blob(rng, 5, 5)}))
    assert {k: len(v) for k, v in memory.per_class.items()} == {"a": 3, "b": 3}
    assert memory.nbytes == 6 * T * D * 2  # float16
    first_a = memory.per_class["a"].copy()

    memory.update(table({"c": blob(rng, 4, -5)}))
    assert {k: len(v) for k, v in memory.per_class.items()} == {"a": 2, "b": 2, "c": 2}
    # shrinking keeps the best-first prefix of the earlier selection
    np.testing.assert_array_equal(memory.per_class["a"], first_a[:2])

    payload = memory.payload()
    assert payload["mode"] == "exemplar"
    assert payload["features"].shape == (6, T, D)
    assert payload["labels"] == ["a", "a", "b", "b", "c", "c"]
    assert memory.nbytes == payload["features"].nbytes == 6 * T * D * 2


def test_exemplar_class_with_fewer_images_than_quota_keeps_them_all():
    rng = np.random.default_rng(1)
    memory = ExemplarMemory(budget=10)
    memory.update(table({"a": blob(rng, 2, 0), "b": blob(rng, 8, 3)}))
    assert {k: len(v) for k, v in memory.per_class.items()} == {"a": 2, "b": 5}


def test_exemplars_are_stored_in_herding_order():
    rng = np.random.default_rng(2)
    feats = blob(rng, 7, 1)
    memory = ExemplarMemory(budget=4, selection="herding")
    memory.update(table({"a": feats}))
    expected = feats[herding_order(pooled(feats))[:4]]
    np.testing.assert_array_equal(memory.per_class["a"], expected)


def test_random_selection_is_seeded_and_picks_real_members():
    rng = np.random.default_rng(3)
    feats = blob(rng, 20, 0)
    picks = []
    for seed in (0, 0, 1):
        memory = make_memory("exemplar", budget=5, selection="random", seed=seed)
        memory.update(table({"a": feats}))
        chosen = memory.per_class["a"]
        assert chosen.shape == (5, T, D)
        members = {f.tobytes() for f in feats}
        assert all(c.tobytes() in members for c in chosen)
        assert len({c.tobytes() for c in chosen}) == 5  # without repetition
        picks.append([c.tobytes() for c in chosen])
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]
    herded = ExemplarMemory(budget=5, selection="herding")
    herded.update(table({"a": feats}))
    assert [c.tobytes() for c in herded.per_class["a"]] != picks[0]


def test_herding_picks_the_sample_closest_to_the_mean_first():
    s = 1 / np.sqrt(2)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [s, s]])
    order = herding_order(vectors)
    assert order[0] == 2  # the diagonal is nearest the mean direction
    assert sorted(order.tolist()) == [0, 1, 2]  # a permutation: every sample exactly once

    # scale does not matter (vectors are normalised): without normalisation the long diagonal
    # would be the farthest from the raw mean (2.7, 2.7) and [1, 0] would come first
    scaled = vectors * np.array([[1.0], [1.0], [10.0]])
    assert herding_order(scaled)[0] == 2

    # a sample exactly at the mean of a symmetric cloud is chosen first; its mirror pairs follow
    cloud = np.array([[1.0, 0.2], [1.0, 0.0], [1.0, -0.2], [1.0, 0.5], [1.0, -0.5]])
    order = herding_order(cloud)
    assert order[0] == 1
    assert set(order[1:3].tolist()) in ({0, 2}, {3, 4})


def test_sample_replay_from_exemplars_draws_the_requested_count_with_labels():
    rng = np.random.default_rng(4)
    memory = ExemplarMemory(budget=4)
    a, b = np.full((3, T, D), 1.0, np.float16), np.full((3, T, D), -2.0, np.float16)
    memory.update(table({"a": a, "b": b}))
    feats, labels = sample_replay(memory.payload(), 200, np.random.default_rng(0))
    assert feats.shape == (200, T, D) and feats.dtype == np.float32
    assert len(labels) == 200 and set(labels) == {"a", "b"}
    for f, label in zip(feats, labels):
        assert (f == (1.0 if label == "a" else -2.0)).all()
    counts = Counter(labels)
    assert 60 < counts["a"] < 140  # both classes are drawn
    again, labels_again = sample_replay(memory.payload(), 200, np.random.default_rng(0))
    assert labels_again == labels and np.array_equal(again, feats)


def test_pseudo_samples_follow_the_class_statistics():
    rng = np.random.default_rng(5)
    means = {"a": np.array([[0.0, 3.0, -3.0], [1.0, 1.0, 1.0]]), "b": np.array([[10.0, 0, 0], [0, 0, -10]])}
    memory = PseudoFeatureReplay()
    memory.update(table({name: (m + 0.5 * rng.standard_normal((400, T, D))) for name, m in means.items()}))
    feats, labels = sample_replay(memory.payload(), 4000, np.random.default_rng(1))
    assert feats.shape == (4000, T, D) and feats.dtype == np.float32
    labels = np.asarray(labels)
    assert set(labels) == {"a", "b"}
    assert 1800 < (labels == "a").sum() < 2200  # classes drawn uniformly
    for name, mean in means.items():
        drawn = feats[labels == name]
        np.testing.assert_allclose(drawn.mean(0), memory.stats[name][0], atol=0.06)
        np.testing.assert_allclose(drawn.std(0), memory.stats[name][1], atol=0.06)
        np.testing.assert_allclose(drawn.mean(0), mean, atol=0.12)


def test_sample_replay_with_nothing_to_draw_is_empty():
    rng = np.random.default_rng(0)
    feats, labels = sample_replay(None, 10, rng)
    assert len(feats) == 0 and labels == []
    memory = PseudoFeatureReplay()
    memory.update(table({"a": np.ones((2, T, D))}))
    feats, labels = sample_replay(memory.payload(), 0, rng)
    assert len(feats) == 0 and labels == []


def test_make_memory_modes():
    assert isinstance(make_memory("none"), NoReplay)
    assert isinstance(make_memory("pseudo"), PseudoFeatureReplay)
    memory = make_memory("exemplar", budget=7, selection="random", seed=3)
    assert isinstance(memory, ExemplarMemory)
    assert (memory.budget, memory.selection) == (7, "random")
    with pytest.raises(ValueError, match="unknown replay mode 'replay-all'"):
        make_memory("replay-all")
