"""End to end: the real pipeline (QuickDraw, EfficientNet-Lite0, SmolLM2, Ray Train) on a few classes.

One incremental run of two tasks serves every test of the first part (a run is the expensive part): it announces
each task's version to a running Ray Serve application, as a production job would, and the tests check its
results, its store and the service.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
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


TOKEN = "job-announce-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def announced_run(tmp_path_factory):
    """(config, results, service URL) of one run that announced its versions to a running service."""
    from ray import serve

    from serve.app import start

    tmp_path = tmp_path_factory.mktemp("announced")
    if ray.is_initialized():
        ray.shutdown()
    # the service's replicas reserve 1.25 CPUs; the two training workers need whole ones beside them
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GMM_CIL_SERVE_TOKEN", TOKEN)  # the job announces with it
            url = start(str(tmp_path / "store"), port=free_port(), token=TOKEN)
            assert httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).status_code == 503  # nothing published
            cfg = small_config(tmp_path, store_url=str(tmp_path / "store"), announce_url=url)
            yield cfg, run_experiment(cfg), url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_incremental_run_writes_results_store_and_plot(announced_run):
    cfg, results, _ = announced_run
    run = Path(cfg.output_dir)

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

    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["methods"]["ncm"]["overall"] == results["methods"]["ncm"]["overall"]
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    store = ProjectionStore(cfg.store_url)
    assert store.versions() == [0, 1]
    manifest, weights = store.load(1)
    assert manifest.seen_classes == results["scenario"]["class_order"]
    assert manifest.metrics["accuracy"] == pytest.approx(gmm["overall"][1])
    assert len(weights) > 1280 * 576 * 4


def test_the_job_moved_the_running_service_to_each_new_version(announced_run):
    _, results, url = announced_run
    deadline, model = time.monotonic() + 120, {}
    while time.monotonic() < deadline:  # the last announcement may still be rolling out
        model = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
        if model.get("version") == 1:
            break
        time.sleep(1)
    assert model["version"] == 1 and model["task"] == 1
    assert model["seen_classes"] == results["scenario"]["class_order"]


def test_a_task_without_training_images_fails_before_touching_the_store(tmp_path):
    cfg = small_config(tmp_path, dataset={"kind": "quickdraw", "train_per_class": 0, "test_per_class": 2})
    with pytest.raises(ValueError, match="no training images"):
        run_experiment(cfg)
    assert ProjectionStore(cfg.store_url).versions() == []
