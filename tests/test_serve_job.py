"""The incremental job announces each new version to a running service (real models, QuickDraw)."""
from __future__ import annotations

import socket
import time

import httpx
import pytest
import ray

from cil_platform.config import ExperimentConfig
from cil_platform.experiment import run_experiment

pytestmark = pytest.mark.e2e
TOKEN = "job-announce-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_moves_a_running_service_to_each_new_version(tmp_path, monkeypatch):
    from ray import serve

    from serve.app import start

    monkeypatch.setenv("GMM_CIL_SERVE_TOKEN", TOKEN)
    if ray.is_initialized():
        ray.shutdown()
    # the service's replicas reserve 1.25 CPUs; the training workers need whole ones beside them
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    store_url = str(tmp_path / "store")
    try:
        url = start(store_url, port=free_port(), token=TOKEN)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/v1/model", headers=auth, timeout=30).status_code == 503  # nothing published yet
        cfg = ExperimentConfig.model_validate({
            "name": "announce", "output_dir": str(tmp_path / "run"), "store_url": store_url, "announce_url": url,
            "dataset": {"train_per_class": 6, "test_per_class": 3},
            "scenario": {"num_classes": 4, "increment": 2, "order_seed": 5},
            "train": {"num_workers": 1, "threads_per_worker": 1, "batch_size": 6},
            "eval": {"actors": 1}, "baselines": []})
        results = run_experiment(cfg)
        deadline, model = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            model = httpx.get(f"{url}/v1/model", headers=auth, timeout=30).json()
            if model.get("version") == 1:
                break
            time.sleep(1)
        assert model["version"] == 1 and model["task"] == 1
        assert model["seen_classes"] == results["scenario"]["class_order"]
    finally:
        serve.shutdown()
        ray.shutdown()
