"""Forgetting control: pseudo-feature statistics, exemplar memory with a shrinking budget, herding, sampling."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cil_platform.class_stats import ClassStatistics
from cil_platform.features import FeatureTable
from cil_platform.replay import (ExemplarMemory, NoReplay, PseudoFeatureReplay, SharedCovarianceReplay, herding_order,
                                 make_memory, pooled, sample_replay)

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


def pseudo(train: FeatureTable | None = None) -> PseudoFeatureReplay:
    """Pseudo replay over class statistics learned from `train` (the experiment learns them every task)."""
    stats = ClassStatistics()
    if train is not None:
        stats.learn(train)
    return PseudoFeatureReplay(stats)


def test_pseudo_stats_are_per_class_per_token_mean_and_std():
    a = np.array([[[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [4, 7, 6]]], dtype=np.float16)
    b = np.array([[[10, 10, 10], [0, 0, 0]]], dtype=np.float16)
    memory = pseudo(table({"cat": a, "dog": b}))
    stats = memory.stats
    assert stats.mean["cat"].shape == stats.std["cat"].shape == (T, D) and stats.mean["cat"].dtype == np.float32
    np.testing.assert_allclose(stats.mean["cat"], [[2, 2, 2], [4, 6, 6]])
    np.testing.assert_allclose(stats.std["cat"], [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(stats.mean["dog"], b[0])
    np.testing.assert_allclose(stats.std["dog"], np.zeros((T, D)))
    assert memory.nbytes == 0  # the memory holds nothing of its own: the statistics are counted by their owner
    assert stats.nbytes(memory.stats_parts) == 2 * 2 * T * D * 4  # two classes x (mean + std) x float32

    payload = memory.payload()
    assert payload["mode"] == "pseudo"
    assert payload["classes"] == ["cat", "dog"]
    assert payload["mean"].shape == payload["std"].shape == (2, T, D)
    np.testing.assert_allclose(payload["mean"][1], b[0])

    stats.learn(table({"eel": a[:1]}))  # a later task adds classes, keeps the old ones
    assert memory.payload()["classes"] == ["cat", "dog", "eel"]
    assert stats.nbytes(memory.stats_parts) == 3 * 2 * T * D * 4


def test_one_set_of_class_statistics_serves_replay_prior_and_prototypes_and_survives_a_round_trip():
    """The prior's class means, the replay Gaussians and the prototypes come from the same per-class statistics,
    stored once: a part used twice is counted once."""
    rng = np.random.default_rng(1)
    interleaved = table({"cat": blob(rng, 3, 0.0), "dog": blob(rng, 2, 5.0)})
    order = np.array([0, 3, 1, 4, 2])  # classes interleaved: dog's rows are not contiguous
    interleaved = FeatureTable(interleaved.features[order], interleaved.labels[order], interleaved.keys[order])
    stats = ClassStatistics()
    stats.learn(interleaved)
    assert stats.classes == ["cat", "dog"]
    payload = PseudoFeatureReplay(stats).payload()
    for index, name in enumerate(("cat", "dog")):
        rows = interleaved.features[interleaved.labels == name].astype(np.float32)
        np.testing.assert_allclose(stats.mean[name], rows.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(payload["mean"][index], stats.mean[name])
        pooled_rows = rows.mean(1) / np.linalg.norm(rows.mean(1), axis=1, keepdims=True)
        expected = pooled_rows.mean(0) / np.linalg.norm(pooled_rows.mean(0))
        np.testing.assert_allclose(stats.prototype[name], expected, rtol=1e-5)
    assert stats.matrix("mean", ["dog", "cat"]).shape == (2, T, D)
    np.testing.assert_array_equal(stats.matrix("mean", ["dog", "cat"])[0], stats.mean["dog"])
    assert stats.nbytes(["mean", "std", "mean"]) == 2 * 2 * T * D * 4
    assert stats.nbytes(["prototype"]) == 2 * D * 4
    with pytest.raises(KeyError, match="eel"):
        stats.matrix("mean", ["eel"])
    restored = ClassStatistics()
    restored.load_state_dict(stats.state_dict())
    for part in ("mean", "std", "prototype"):
        np.testing.assert_array_equal(restored.matrix(part, ["cat", "dog"]), stats.matrix(part, ["cat", "dog"]))
    assert restored.classes == stats.classes


def test_empty_memories_have_no_payload_and_no_bytes():
    for memory in (NoReplay(), pseudo(), ExemplarMemory(10)):
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
        memory = make_memory("exemplar", ClassStatistics(), budget=5, selection="random", seed=seed)
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
    memory = pseudo(table({name: (m + 0.5 * rng.standard_normal((400, T, D))) for name, m in means.items()}))
    feats, labels = sample_replay(memory.payload(), 4000, np.random.default_rng(1))
    assert feats.shape == (4000, T, D) and feats.dtype == np.float32
    labels = np.asarray(labels)
    assert set(labels) == {"a", "b"}
    assert 1800 < (labels == "a").sum() < 2200  # classes drawn uniformly
    for name, mean in means.items():
        drawn = feats[labels == name]
        np.testing.assert_allclose(drawn.mean(0), memory.stats.mean[name], atol=0.06)
        np.testing.assert_allclose(drawn.std(0), memory.stats.std[name], atol=0.06)
        np.testing.assert_allclose(drawn.mean(0), mean, atol=0.12)


def test_shared_covariance_samples_keep_the_class_means_and_the_correlations_a_diagonal_loses():
    rng = np.random.default_rng(6)
    mix = np.array([[1.0, 0.9, 0.0], [0.0, 0.4, 0.3], [0.0, 0.0, 0.2]])  # one correlated covariance for both classes
    means = {"a": np.array([[0.0, 3.0, -3.0], [1.0, 1.0, 1.0]]), "b": np.array([[10.0, 0, 0], [0, 0, -10]])}
    task = table({name: m + rng.standard_normal((600, T, D)) @ mix for name, m in means.items()})
    stats = ClassStatistics()
    stats.learn(task)
    shared, diagonal = SharedCovarianceReplay(stats), PseudoFeatureReplay(stats)
    assert shared.payload() is None  # nothing learned by the memory yet
    shared.update(task)
    assert shared.dof == 2 * 599 and shared.nbytes == T * D * D * 8
    true = mix.T @ mix
    feats, labels = sample_replay(shared.payload(), 6000, np.random.default_rng(1))
    plain, plain_labels = sample_replay(diagonal.payload(), 6000, np.random.default_rng(1))
    for name, mean in means.items():
        drawn = feats[np.asarray(labels) == name]
        np.testing.assert_allclose(drawn.mean(0), mean, atol=0.12)
        cov = np.cov(drawn[:, 0].T)
        # shrunk by 10 % towards its diagonal: the off-diagonal covariance is 0.9 of the true one, within sampling
        np.testing.assert_allclose(cov, 0.9 * true + 0.1 * np.diag(np.diag(true)), atol=0.08)
        plain_cov = np.cov(plain[np.asarray(plain_labels) == name][:, 0].T)
        assert abs(plain_cov[0, 1]) < 0.08 < 0.9 * true[0, 1] - 0.1  # the diagonal Gaussian has none of it
    restored = SharedCovarianceReplay(stats)
    restored.load_state_dict(shared.state_dict())
    assert restored.dof == shared.dof and np.array_equal(restored.payload()["factor"], shared.payload()["factor"])


def test_sample_replay_with_nothing_to_draw_is_empty():
    rng = np.random.default_rng(0)
    feats, labels = sample_replay(None, 10, rng)
    assert len(feats) == 0 and labels == []
    memory = pseudo(table({"a": np.ones((2, T, D))}))
    feats, labels = sample_replay(memory.payload(), 0, rng)
    assert len(feats) == 0 and labels == []


def test_make_memory_modes():
    stats = ClassStatistics()
    assert isinstance(make_memory("none", stats), NoReplay)
    assert make_memory("pseudo", stats).stats is stats
    assert isinstance(make_memory("pseudo", stats, covariance="shared"), SharedCovarianceReplay)
    with pytest.raises(ValueError, match="unknown pseudo-feature covariance 'full'"):
        make_memory("pseudo", stats, covariance="full")
    memory = make_memory("exemplar", stats, budget=7, selection="random", seed=3)
    assert isinstance(memory, ExemplarMemory)
    assert (memory.budget, memory.selection) == (7, "random")
    with pytest.raises(ValueError, match="unknown replay mode 'replay-all'"):
        make_memory("replay-all", stats)
