"""Few-shot CIL: config validation, the scenario factory and the seeded K-shot choice of training images."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cil_platform.config import ExperimentConfig, ScenarioConfig
from cil_platform.scenario import ClassIncremental, FewShotIncremental, build_scenario

NAMES = [f"c{i:03d}" for i in range(30)]


def few_shot(**fields) -> ScenarioConfig:
    return ScenarioConfig(kind="few_shot", **{"num_classes": 20, "base_classes": 10, "ways": 5, "shots": 3, **fields})


def images(classes, per_class: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, content keys) of `per_class` images of each class; keys unique per prefix (split)."""
    labels = np.array([c for c in classes for _ in range(per_class)], dtype=object)
    keys = np.array([f"{prefix}-{c}-{i}" for c in classes for i in range(per_class)], dtype=object)
    return labels, keys


def test_factory_builds_both_kinds_with_the_same_class_order():
    plain = build_scenario(ScenarioConfig(num_classes=20, initial=10, increment=5, order_seed=4), NAMES)
    assert type(plain) is ClassIncremental and plain.name == "B10-Inc5"
    fs = build_scenario(few_shot(order_seed=4), NAMES, seed=1)
    assert isinstance(fs, FewShotIncremental) and fs.name == "FS-B10-5w3s"
    assert fs.class_order == plain.class_order  # same seed, same order: only the shots differ
    assert [len(t.new_classes) for t in fs] == [10, 5, 5]
    assert [fs.shots_for(i) for i in range(3)] == [None, 3, 3]
    assert fs.shot_seed == 1
    explicit = build_scenario(few_shot(class_order=list(reversed(NAMES[:20]))), NAMES)
    assert explicit.class_order == list(reversed(NAMES[:20]))


def test_config_validation_names_the_problem():
    with pytest.raises(ValidationError, match="few_shot needs shots, ways"):
        ScenarioConfig(kind="few_shot", base_classes=10)
    with pytest.raises(ValidationError, match="not increment, initial"):
        few_shot(initial=10, increment=5)
    with pytest.raises(ValidationError, match="shots only apply to scenario kind few_shot"):
        ScenarioConfig(shots=5)
    with pytest.raises(ValidationError, match="last task would be partial"):  # 22 - 10 is not a multiple of 5
        few_shot(num_classes=22)
    with pytest.raises(ValidationError, match="shots"):
        few_shot(shots=0)
    with pytest.raises(ValidationError, match="kind"):
        ScenarioConfig(kind="few-shot")
    cfg = ExperimentConfig.model_validate({"scenario": {"kind": "few_shot", "num_classes": 70, "base_classes": 40,
                                                        "ways": 5, "shots": 5}})
    assert cfg.scenario.kind == "few_shot" and ScenarioConfig().kind == "class_incremental"


def test_base_session_full_sessions_k_shot_deterministic_and_disjoint_from_test():
    scenario = build_scenario(few_shot(), NAMES, seed=0)
    train_labels, train_keys = images(scenario.class_order, 8, "train")
    _, test_keys = images(scenario.class_order, 4, "test")
    base, first, second = list(scenario)

    base_mask = scenario.training_mask(base, train_labels, train_keys)
    assert base_mask.sum() == 10 * 8 and set(train_labels[base_mask]) == set(base.new_classes)

    chosen = {}
    for session in (first, second):
        mask = scenario.training_mask(session, train_labels, train_keys)
        picked = train_labels[mask]
        assert {c: int((picked == c).sum()) for c in session.new_classes} == {c: 3 for c in session.new_classes}
        assert set(picked) == set(session.new_classes)  # nothing of the base or other sessions
        chosen[session.index] = set(train_keys[mask])
        assert chosen[session.index].isdisjoint(test_keys)

    # the same choice whatever order the rows come in, and another seed chooses differently
    order = np.random.default_rng(3).permutation(len(train_labels))
    shuffled = scenario.training_mask(first, train_labels[order], train_keys[order])
    assert set(train_keys[order][shuffled]) == chosen[1]
    assert set(train_keys[scenario.training_mask(first, train_labels, train_keys)]) == chosen[1]
    reseeded = build_scenario(few_shot(), NAMES, seed=5)
    assert set(train_keys[reseeded.training_mask(first, train_labels, train_keys)]) != chosen[1]

    # plain CIL keeps every image of the task's classes
    plain = build_scenario(ScenarioConfig(num_classes=20, initial=10, increment=5), NAMES)
    assert plain.training_mask(plain[1], train_labels, train_keys).sum() == 5 * 8


def test_a_session_class_with_fewer_than_k_images_is_an_error():
    scenario = build_scenario(few_shot(), NAMES)
    labels, keys = images(scenario.class_order, 2, "train")
    assert scenario.training_mask(scenario[0], labels, keys).sum() == 20  # the base session has no shot budget
    with pytest.raises(ValueError, match=r"session 1: class '.*' has 2 training images, fewer than shots=3"):
        scenario.training_mask(scenario[1], labels, keys)
