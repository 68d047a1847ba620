"""End to end: the real pipeline (QuickDraw, EfficientNet-Lite0, SmolLM2, Ray Train) on a few classes.

One incremental run of two tasks serves every test of the first part (a run is the expensive part): it announces
each task's version to a running Ray Serve application, as a production job would (`on_publish=announcer(...)`),
and the tests check its results, its store and the service, down to the service answering every test image as the
evaluation did.
"""
from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import ray

from cil_platform.config import ExperimentConfig
from cil_platform.experiment import run_experiment
from cil_platform.storage.store import ProjectionStore

pytestmark = pytest.mark.e2e


def small_config(tmp_path, **overrides) -> ExperimentConfig:
    tree = {
        "name": "e2e",
        "dataset": {"kind": "quickdraw", "train_per_class": 12, "test_per_class": 6},
        "scenario": {"num_classes": 4, "initial": 0, "increment": 2, "order_seed": 3},
        "train": {"num_workers": 2, "batch_size": 6, "lr": 2e-3},
        "replay": {"mode": "pseudo"},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in overrides.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.model_validate(tree)


TOKEN = "client-api-token"
ADMIN_TOKEN = "job-announce-admin-token"  # what a job announces with
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def announced_run(tmp_path_factory):
    """(config, results, service URL) of one run that announced its versions to a running service."""
    from ray import serve

    from serve.client import announcer
    from serve.deploy import start

    tmp_path = tmp_path_factory.mktemp("announced")
    if ray.is_initialized():
        ray.shutdown()
    # the service's replicas reserve 1.25 CPUs; the two training workers need whole ones beside them
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = start(str(tmp_path / "store"), port=free_port(), token=TOKEN, admin_token=ADMIN_TOKEN)
        assert httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).status_code == 503  # nothing published
        cfg = small_config(tmp_path, store_url=str(tmp_path / "store"),
                           baselines=["ncm", "linear_sequential", "joint", "ridge"])
        yield cfg, run_experiment(cfg, on_publish=announcer(url, ADMIN_TOKEN)), url
    finally:
        serve.shutdown()
        ray.shutdown()


BASE, FUSED, RIDGE = "gmm[pseudo,trie+prior]", "gmm[pseudo,trie+prior+prototypes]", "gmm[pseudo,trie+prior+ridge]"
D = 1280  # the encoder's width


def test_incremental_run_writes_results_store_and_plot(announced_run):
    from gmm_model.classify import ClassifierStats

    cfg, results, _ = announced_run
    run = Path(cfg.output_dir)

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

    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["methods"]["ncm"]["overall"] == results["methods"]["ncm"]["overall"]
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


def served_model(url: str, version: int, timeout_s: float = 120.0) -> dict:
    """/v1/model once `version` is served (the last announcement may still be rolling out)."""
    deadline, model = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        model = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
        if model.get("version") == version:
            break
        time.sleep(1)
    return model


def test_the_job_moved_the_running_service_to_each_new_version(announced_run):
    cfg, results, url = announced_run
    model = served_model(url, 1)
    assert model["version"] == 1 and model["task"] == 1
    assert model["seen_classes"] == results["scenario"]["class_order"]
    assert model["rule"] == "trie+prior+ridge"
    assert "trie+prior+ridge" in model["rules"] and "trie+prior+prototypes" not in model["rules"]
    assert model["metrics"]["accuracy"] == pytest.approx(results["methods"][RIDGE]["overall"][1])


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_the_service_answers_each_test_image_as_the_evaluation_did(announced_run):
    """The served classifier is the measured one: every test image of the final version, sent as a PNG, gets the
    label the evaluation's own code gives its cached features with the version's rule and class statistics."""
    from cil_platform.data import load_dataset
    from cil_platform.evaluation import predict
    from cil_platform.features import FeatureCache
    from gmm_model import create_encoder, create_gmm
    from gmm_model.classify import ClassifierStats
    from gmm_model.rules import Rule

    cfg, _, url = announced_run
    assert served_model(url, 1)["version"] == 1
    store = ProjectionStore(cfg.store_url)
    manifest, weights = store.load(1)
    classes, rule = list(manifest.seen_classes), Rule(manifest.rule)
    stats = ClassifierStats.from_bytes(store.class_stats(manifest))

    rows = load_dataset(cfg.dataset, classes=classes).test.dataset.take_all()
    assert len(rows) == 4 * 6 and all(not row["error"] for row in rows)
    encoder = create_encoder(cfg.stack)
    cached = FeatureCache(cfg.features_url, encoder.identity, cfg.storage.options).load_all()
    features = np.stack([cached[row["key"]] for row in rows])
    gmm = create_gmm(cfg.stack, encoder.width, cfg.cache_dir, weights)
    with torch.no_grad():
        found = predict(gmm, None, features, classes, cfg.eval.batch_size, [rule], stats)[rule]  # class indices
    expected = [classes[i] for i in found]
    # the same images as the evaluation of task 1: the recomputation reproduces the accuracy it recorded
    accuracy = np.mean([label == row["label"] for label, row in zip(expected, rows)])
    assert accuracy == pytest.approx(manifest.metrics["accuracy"])

    def ask(row) -> dict:
        response = httpx.post(f"{url}/v1/classify", content=png(row["image"]), timeout=120,
                              headers={"Content-Type": "image/png", **AUTH})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:  # concurrent, so the Captioner batches them as it would any traffic
        answers = list(pool.map(ask, rows))
    assert {answer["version"] for answer in answers} == {1}
    assert {answer["rule"] for answer in answers} == {manifest.rule}
    mismatches = [(row["label"], answer["label"], label) for row, answer, label in zip(rows, answers, expected)
                  if answer["label"] != label]
    assert not mismatches, f"(true, served, evaluated): {mismatches}"


def test_a_task_without_training_images_fails_before_touching_the_store(tmp_path):
    cfg = small_config(tmp_path, dataset={"kind": "quickdraw", "train_per_class": 0, "test_per_class": 2})
    with pytest.raises(ValueError, match="no training images"):
        run_experiment(cfg)
    assert ProjectionStore(cfg.store_url).versions() == []


def test_a_finished_run_run_again_resumes_with_nothing_to_train_and_starts_no_session(announced_run):
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

    cfg, results, _ = announced_run
    console = Phases()
    again = run_experiment(cfg, console=console)
    assert any("2 of 2 tasks were completed" in line for line in console.lines), console.lines
    assert "features" in console.phases and "workers" not in console.phases, console.phases
    assert again["methods"] == results["methods"]
