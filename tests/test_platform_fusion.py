"""The ridge fusion (cil_platform/fusion.py): validation rows from training data only, weights chosen on them, the
ridge head it publishes (the ridge baseline's, shared with it), its run-state round trip, and classifier alignment's
target. In memory, no Ray: a FeatureTable has a streamed FeatureSet's interface."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cil_platform.baselines import LearnedRidge, make_baseline
from cil_platform.class_stats import ClassStatistics
from cil_platform.closed_form import Ridge, holdout_mask
from cil_platform.features import FeatureTable
from cil_platform.fusion import GENERATIVE_WEIGHTS, RidgeFusion, alignment_target, choose_fusion
from gmm_model.classify import ridge_fused_scores

T, D = 2, 6


def task_table(rng, classes: list[str], n: int) -> FeatureTable:
    """n drawings per class, each class's tokens pointing along its own axis."""
    features, labels = [], []
    for name in classes:
        centre = np.zeros((T, D))
        centre[:, int(name[1:]) % D] = 3.0
        features.append(centre + rng.standard_normal((n, T, D)))
        labels += [name] * n
    keys = [f"{name}-{i}-{rng.integers(1 << 30)}" for i, name in enumerate(labels)]
    return FeatureTable(np.concatenate(features).astype(np.float16), np.asarray(labels, dtype=object),
                        np.asarray(keys, dtype=object))


@pytest.fixture
def two_tasks():
    rng = np.random.default_rng(0)
    return task_table(rng, ["c0", "c1", "c2"], 10), task_table(rng, ["c3", "c4"], 10)


def test_validation_is_the_tasks_held_out_rows_and_pseudo_features_of_old_classes(two_tasks):
    first, second = two_tasks
    stats, fusion = ClassStatistics(), RidgeFusion(seed=0)
    fusion.learn_and_validate(first, stats, ["c0", "c1", "c2"], 0, 4)
    stats.learn(first)
    seen = ["c0", "c1", "c2", "c3", "c4"]
    validation = fusion.learn_and_validate(second, stats, seen, 1, 4)
    held = holdout_mask(np.asarray(second.labels), np.asarray(second.keys), 0)
    assert held.sum() == 4 and np.array_equal(fusion.held_out(second), held)  # 2 of 10 per new class
    # the held rows are handed on as rows of the task's set (streamed to the workers), not as features
    assert np.array_equal(validation.held.keys, second.keys[held])
    new = [seen.index(str(c)) for c in second.labels[held]]
    assert validation.targets.tolist() == new + [0] * 4 + [1] * 4 + [2] * 4
    pseudo = validation.pseudo
    copies = (pseudo[:, None] == first.features[None].astype(np.float32)).all((2, 3)).any(1)
    assert pseudo.shape == (12, T, D) and not copies.any()  # drawn from the Gaussians, no stored feature
    for c in range(3):  # each old class's draws scatter around its own mean
        assert np.abs(pseudo[4 * c: 4 * c + 4].mean(0) - stats.mean[f"c{c}"]).mean() < 1.0
    assert validation.ridge_scores.shape == (16, 5)
    features = np.concatenate([validation.held.features.astype(np.float32), pseudo])
    embedded = torch.nn.functional.normalize(torch.from_numpy(features).double().mean(1), dim=1)
    # the held rows were not in the ridge that scored them: it differs from the full fit on exactly those rows
    full = embedded @ fusion.ridge.weight
    assert not torch.allclose(full[: held.sum()], validation.ridge_scores[: held.sum()], atol=1e-3)
    kept = Ridge(seed=0)  # the same ridge, learned on the first task and the second's kept rows only
    kept.learn(first, ["c0", "c1", "c2"])
    fit = kept.without(kept.embed(second), second.labels.astype(str), held)
    weight, _ = kept.solve(fit, fusion.ridge.chosen[-1])
    assert torch.allclose(embedded @ weight, validation.ridge_scores, atol=1e-5)
    # the held rows' ridge scores are mostly right on these separable classes: the weights are chosen on real signal
    assert (validation.ridge_scores.argmax(1).numpy() == validation.targets).mean() >= 0.75


def test_the_ridge_head_is_the_ridge_baselines_after_the_same_tasks(two_tasks):
    stats, fusion, baseline = ClassStatistics(), RidgeFusion(seed=0), Ridge(seed=0)
    seen: list[str] = []
    for task in two_tasks:
        seen += [str(c) for c in dict.fromkeys(task.labels)]
        fusion.learn_and_validate(task, stats, seen, 0, 2)
        stats.learn(task)
        baseline.learn(task, seen)
    assert torch.allclose(fusion.head(seen), baseline.weight.T.float())
    assert fusion.chosen == [] and fusion.scale == 1.0
    shared = make_baseline("ridge", stats, 0, ridge=fusion.ridge)  # the baseline reads the fusion's ridge
    assert isinstance(shared, LearnedRidge) and shared.memory_bytes == baseline.memory_bytes > 0
    shared.learn(two_tasks[0], seen)  # a no-op: learning it again would count the task twice
    assert fusion.ridge.stats.counts.sum() == 50
    assert shared.predict(two_tasks[1], seen) == baseline.predict(two_tasks[1], seen)


def test_fusion_weights_follow_what_the_generative_score_is_worth():
    rng = np.random.default_rng(1)
    targets = rng.integers(5, size=200)
    ridge = torch.from_numpy(rng.standard_normal((200, 5)) * 0.3)
    ridge[torch.arange(200), torch.from_numpy(targets)] += 0.4  # a weak but real ridge signal
    informative = torch.nn.functional.one_hot(torch.from_numpy(targets), 5).double() * 2 + torch.randn(200, 5)
    a, b = choose_fusion(ridge, informative, targets)
    assert b / a >= 0.1
    fused = ridge_fused_scores(informative, torch.zeros(200, 1, 5), torch.eye(5), torch.tensor([a, b]))
    assert fused.shape == (200, 5)
    noise = torch.from_numpy(rng.standard_normal((200, 5)))
    a, b = choose_fusion(ridge, noise, targets)
    assert b / a <= GENERATIVE_WEIGHTS[3]  # at most a thousandth-scale weight on pure noise


def test_the_fused_rule_is_ridge_alone_at_zero_weight_and_generative_alone_at_zero_scale():
    visual = torch.tensor([[[0.9, 0.1, 0.0]], [[0.0, 0.2, 0.9]]])
    head = torch.eye(3)  # ridge picks the largest coordinate: classes 0 and 2
    generative = torch.tensor([[-3.0, -0.1, -2.0], [-0.2, -4.0, -3.0]])  # GMM says 1 and 0
    assert ridge_fused_scores(generative, visual, head, torch.tensor([10.0, 0.0])).argmax(1).tolist() == [0, 2]
    assert ridge_fused_scores(generative, visual, head, torch.tensor([0.0, 1.0])).argmax(1).tolist() == [1, 0]


def test_state_round_trips_and_continues_identically(two_tasks):
    first, second = two_tasks
    seen = ["c0", "c1", "c2"]
    stats, fusion = ClassStatistics(), RidgeFusion(seed=3)
    fusion.learn_and_validate(first, stats, seen, 0, 2)
    fusion.chosen.append((10.0, 0.5))
    stats.learn(first)
    restored = RidgeFusion(seed=3)
    restored.load_state_dict(fusion.state_dict())
    assert restored.chosen == [(10.0, 0.5)] and restored.scale == 10.0
    seen = seen + ["c3", "c4"]
    a = fusion.learn_and_validate(second, stats, seen, 1, 2)
    b = restored.learn_and_validate(second, stats, seen, 1, 2)
    assert torch.equal(a.ridge_scores, b.ridge_scores) and torch.equal(fusion.head(seen), restored.head(seen))


def test_alignment_target_is_the_ridge_posterior_summed_over_shared_first_tokens():
    features = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]], np.float32)
    head = torch.eye(3)
    token_of_class = torch.tensor([0, 1, 1])  # classes 1 and 2 share a first token
    target = alignment_target(features, head, 20.0, token_of_class, 2)
    assert torch.allclose(target.sum(1), torch.ones(2))
    assert target[0, 0] > 0.99 and target[1, 1] > 0.99  # class 2's mass lands on the shared token
    flat = alignment_target(features, head, 0.0, token_of_class, 2)
    assert torch.allclose(flat, torch.tensor([[1 / 3, 2 / 3]] * 2))
