"""End to end: the real pipeline (QuickDraw, EfficientNet-Lite0, SmolLM2, Ray Train) on a few classes."""
from __future__ import annotations

import json
import os

import pytest
import ray

from cil_platform.config import ExperimentConfig
from cil_platform.experiment import run_experiment
from cil_platform.store import ProjectionStore

pytestmark = pytest.mark.e2e


def small_config(tmp_path, **overrides) -> ExperimentConfig:
    tree = {
        "name": "e2e",
        "dataset": {"kind": "quickdraw", "train_per_class": 12, "test_per_class": 6},
        "scenario": {"num_classes": 4, "initial": 0, "increment": 2, "order_seed": 3},
        "train": {"num_workers": 2, "batch_size": 6, "lr": 2e-3},
        "replay": {"mode": "pseudo"},
        "eval": {"actors": 1},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in overrides.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.model_validate(tree)


@pytest.fixture(scope="module", autouse=True)
def fresh_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_incremental_run_writes_results_store_and_plot(tmp_path):
    cfg = small_config(tmp_path)
    results = run_experiment(cfg)

    gmm = results["methods"]["gmm[pseudo,trie+prior]"]
    assert [len(row) for row in gmm["task_acc"]] == [1, 2]  # a row per task, a column per seen task
    assert len(gmm["overall"]) == 2 and all(0.0 <= a <= 1.0 for a in gmm["overall"])
    # aligned start + pseudo replay: far above chance (1/2 after task 1, 1/4 after task 2)
    assert gmm["overall"][0] > 0.5 and gmm["overall"][1] > 0.25
    assert set(results["methods"]) == {"gmm[pseudo,trie+prior]", "gmm[pseudo,trie+prior+ncm]", "ncm",
                                       "linear_sequential", "joint"}
    fused = results["methods"]["gmm[pseudo,trie+prior+ncm]"]
    assert fused["memory_bytes"] == gmm["memory_bytes"] + 4 * 1280 * 4  # plus one fp32 prototype per class
    # 4 classes x 4 tokens x 1280 x fp32 x (replay mean + std, and the class means the prior is estimated on)
    assert gmm["memory_bytes"] == 4 * 4 * 1280 * 4 * 3

    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["methods"]["ncm"]["overall"] == results["methods"]["ncm"]["overall"]
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    store = ProjectionStore(cfg.store_url)
    assert store.versions() == [0, 1]
    manifest, weights = store.load(1)
    assert manifest.seen_classes == results["scenario"]["class_order"]
    assert manifest.metrics["accuracy"] == pytest.approx(gmm["overall"][1])
    assert len(weights) > 1280 * 576 * 4


def test_a_task_without_training_images_fails_before_touching_the_store(tmp_path):
    cfg = small_config(tmp_path, dataset={"kind": "quickdraw", "train_per_class": 0, "test_per_class": 2})
    with pytest.raises(ValueError, match="no training images"):
        run_experiment(cfg)
    assert ProjectionStore(cfg.store_url).versions() == []
