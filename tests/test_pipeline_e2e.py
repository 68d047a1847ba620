"""End to end: the real pipeline (QuickDraw, EfficientNet-Lite0, SmolLM2, Ray Train) on a few classes, as a user runs
it: `gmm-cil serve` of a store, and `gmm-cil run --announce` moving that service to each version the job publishes.

The run is the session's small run (tests/small_run.py, shared with the terminal test and the scale-out
guarantees: a run is the expensive part); these tests check its results, its store and what the service answered,
down to the service answering every test image as the evaluation did.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cil_platform.experiment import run_experiment
from cil_platform.storage.store import ProjectionStore
from tests.small_run import SmallRun, small_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("ray_shut_down_after")]


@pytest.fixture(scope="module")
def finished(small_run) -> SmallRun:
    assert small_run.exit_code == 0 and small_run.served is not None, small_run.screen[-5000:]
    return small_run


def results_of(run: SmallRun) -> dict:
    return json.loads((run.output_dir / "results.json").read_text())


BASE, FUSED, RIDGE = "gmm[pseudo,trie+prior]", "gmm[pseudo,trie+prior+prototypes]", "gmm[pseudo,trie+prior+ridge]"
D = 1280  # the encoder's width


def test_incremental_run_writes_results_store_and_plot(finished):
    from gmm_model.classify import ClassifierStats

    cfg, results, run = finished.config(), results_of(finished), finished.output_dir

    gmm = results["methods"][BASE]
    assert [len(row) for row in gmm["task_acc"]] == [1, 2]  # a row per task, a column per seen task
    assert len(gmm["overall"]) == 2 and all(0.0 <= a <= 1.0 for a in gmm["overall"])
    # aligned start + pseudo replay: far above chance (1/2 after task 1, 1/4 after task 2)
    assert gmm["overall"][0] > 0.5 and gmm["overall"][1] > 0.25
    assert set(results["methods"]) == {BASE, FUSED, RIDGE, "ncm", "linear_sequential", "joint", "ridge"}
    fused, ridge = results["methods"][FUSED], results["methods"][RIDGE]
    # class statistics are counted once: 4 classes x 4 tokens x 1280 x fp32 x (replay mean + std; the prior is
    # estimated on those same means), the prototype fusion adds one fp32 prototype per class, and the ridge fusion
    # the ridge's float64 statistics (Gram matrix, per-class sums and counts), which the ridge baseline shares
    assert gmm["memory_bytes"] == 4 * 4 * D * 4 * 2
    assert fused["memory_bytes"] == gmm["memory_bytes"] + 4 * D * 4
    ridge_statistics = 8 * (D * D + 4 * D + 4)
    assert ridge["memory_bytes"] == gmm["memory_bytes"] + ridge_statistics
    assert results["methods"]["ridge"]["memory_bytes"] == ridge_statistics
    # one (a, b) per task, from the grids (fusion.py), chosen on held-out training rows
    from cil_platform.fusion import GENERATIVE_WEIGHTS, RIDGE_SCALES

    assert len(ridge["chosen"]) == 2
    for a, b in ridge["chosen"]:
        assert a in RIDGE_SCALES and min(abs(b / a - w) for w in GENERATIVE_WEIGHTS) < 1e-9

    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    store = ProjectionStore(cfg.store_url)
    assert store.versions() == [0, 1]
    manifest, weights = store.load(1)
    assert manifest.seen_classes == results["scenario"]["class_order"]
    # the version records the ridge fusion (the best GMM rule the arena measured), and that rule's accuracy
    assert manifest.rule == results["served_rule"] == "trie+prior+ridge"
    assert manifest.metrics["accuracy"] == pytest.approx(ridge["overall"][1])
    assert manifest.metrics["task_accuracy"] == pytest.approx(ridge["task_acc"][1])
    assert manifest.metrics["accuracy_by_rule"] == pytest.approx({"trie+prior": gmm["overall"][1],
                                                                 "trie+prior+prototypes": fused["overall"][1],
                                                                 "trie+prior+ridge": ridge["overall"][1]})
    assert len(weights) > 1280 * 576 * 4
    # with exactly the statistics that rule needs: a first-token prior, the ridge head's row per seen class (the
    # ridge baseline's weights after the same tasks) and the fusion's (a, b) of the last task; no prototypes
    assert manifest.class_stats is not None
    stats = ClassifierStats.from_bytes(store.class_stats(manifest))
    assert stats.first_token_prior.shape == (4,) and stats.ridge_head.shape == (4, D) and stats.prototypes is None
    assert stats.fusion.tolist() == pytest.approx(ridge["chosen"][-1])
    assert float(stats.ridge_head.norm()) > 0


def test_the_job_moved_the_running_service_to_each_new_version(finished):
    served, results = finished.served, results_of(finished)
    assert served.status_before == 503  # the service was up before anything was published
    model = served.model
    assert model["version"] == 1 and model["task"] == 1
    assert model["seen_classes"] == results["scenario"]["class_order"]
    assert model["rule"] == "trie+prior+ridge"
    assert "trie+prior+ridge" in model["rules"] and "trie+prior+prototypes" not in model["rules"]
    assert model["metrics"]["accuracy"] == pytest.approx(results["methods"][RIDGE]["overall"][1])


def test_the_service_answers_each_test_image_as_the_evaluation_did(finished):
    """The served classifier is the measured one: every test image of the final version, sent as a PNG, got the
    label the evaluation's own code gives its cached features with the version's rule and class statistics."""
    from cil_platform.evaluation import predict
    from cil_platform.features import FeatureCache
    from gmm_model import create_encoder, create_gmm
    from gmm_model.classify import ClassifierStats
    from gmm_model.rules import Rule

    cfg, served = finished.config(), finished.served
    store = ProjectionStore(cfg.store_url)
    manifest, weights = store.load(1)
    classes, rule = list(manifest.seen_classes), Rule(manifest.rule)
    stats = ClassifierStats.from_bytes(store.class_stats(manifest))

    rows = served.test_rows
    assert len(rows) == 4 * 4 and all(not row["error"] for row in rows)
    encoder = create_encoder(cfg.stack)
    cached = FeatureCache(cfg.features_url, encoder.identity, cfg.storage.options).load_all()
    features = np.stack([cached[row["key"]] for row in rows])
    gmm = create_gmm(cfg.stack, encoder.width, cfg.cache_dir, weights)
    with torch.no_grad():
        found = predict(gmm, None, features, classes, cfg.eval.batch_size, [rule], stats)[rule]  # class indices
    expected = [classes[i] for i in found]
    # the same images as the evaluation of task 2: the recomputation reproduces the accuracy it recorded
    accuracy = np.mean([label == row["label"] for label, row in zip(expected, rows)])
    assert accuracy == pytest.approx(manifest.metrics["accuracy"])

    answers = served.answers
    assert all(answer["status"] == 200 for answer in answers), answers
    assert {answer["version"] for answer in answers} == {1}
    assert {answer["rule"] for answer in answers} == {manifest.rule}
    mismatches = [(row["label"], answer["label"], label) for row, answer, label in zip(rows, answers, expected)
                  if answer["label"] != label]
    assert not mismatches, f"(true, served, evaluated): {mismatches}"


def test_a_task_without_training_images_fails_before_touching_the_store(tmp_path):
    cfg = small_config(tmp_path / "run", "dataset.train_per_class=0", "dataset.test_per_class=2")
    with pytest.raises(ValueError, match="no training images"):
        run_experiment(cfg)
    assert ProjectionStore(cfg.store_url).versions() == []


def test_a_finished_run_run_again_resumes_with_nothing_to_train_and_starts_no_session(finished, tmp_path):
    """The training session starts with the first task to run: a resumed run with none left does not pay for it."""
    from cil_platform.progress import Console

    class Phases(Console):  # the console's own extension point: what the run reports, recorded
        def __init__(self):
            super().__init__()
            self.phases, self.lines = [], []

        def phase(self, name):
            self.phases.append(name)

        def say(self, text):
            self.lines.append(text)

    copy = tmp_path / "run"  # the session's run stays as it was for the other tests
    shutil.copytree(finished.output_dir, copy)
    console = Phases()
    again = run_experiment(small_config(copy), console=console)
    assert any("2 of 2 tasks were completed" in line for line in console.lines), console.lines
    assert "features" in console.phases and "workers" not in console.phases, console.phases
    assert json.loads(json.dumps(again["methods"])) == results_of(finished)["methods"]
