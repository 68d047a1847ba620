"""End to end few-shot CIL on the offline stack: QuickDraw, a base session of 6 classes, then 2 sessions of 3-way 3-shot."""
from __future__ import annotations

import pytest

from cil_platform.config import ExperimentConfig
from cil_platform.experiment import run_experiment
from cil_platform.storage.store import ProjectionStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow,  # `make test-slow`: minutes of multi-process runs each
              pytest.mark.usefixtures("ray_shut_down_after")]

FEATURE_BYTES = 4 * 1280 * 2  # one image's cached features: 4 tokens x 1280 x fp16


def test_few_shot_run_trains_k_shots_per_session_and_reports_every_session(tmp_path):
    cfg = ExperimentConfig.model_validate({
        "name": "few-shot-e2e",
        "dataset": {"kind": "quickdraw", "train_per_class": 10, "test_per_class": 5},
        "scenario": {"kind": "few_shot", "num_classes": 12, "base_classes": 6, "ways": 3, "shots": 3,
                     "order_seed": 3},
        "train": {"num_workers": 2, "batch_size": 6, "lr": 2e-3},
        "replay": {"mode": "pseudo"},
        "baselines": ["ncm", "joint"],
        "output_dir": str(tmp_path / "run"),
    })
    results = run_experiment(cfg)

    assert results["scenario"]["name"] == "FS-B6-3w3s"
    gmm = results["methods"]["gmm[pseudo,trie+prior]"]
    print("few-shot e2e accuracy per session:",
          {name: [round(a, 3) for a in row["overall"]] for name, row in results["methods"].items()})
    assert [len(row) for row in gmm["task_acc"]] == [1, 2, 3]
    assert gmm["metrics"]["average_forgetting"] is not None
    assert gmm["overall"][0] > 1 / 6  # the base session: above chance over its 6 classes
    # the joint baseline keeps every training feature it was given: 6 x 10 base, then 3 x 3 per session
    assert results["methods"]["joint"]["memory_bytes"] == (6 * 10 + 2 * 3 * 3) * FEATURE_BYTES
    assert ProjectionStore(cfg.store_url).versions() == [0, 1, 2]
