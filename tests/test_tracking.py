"""MLflow tracking against a real local store (SQLite, as a run uses by default): the run, its parameters without
credentials, per-task metrics stepped by task, the artifacts, resumption, and tracking switched off."""
from __future__ import annotations

import json

import pytest

mlflow = pytest.importorskip("mlflow")

from cil_platform.config import TrackingConfig, load_config  # noqa: E402
from cil_platform.tracking import TrackingOff, default_uri, flatten, metric_key, open_run, start_tracking  # noqa: E402


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "name=tracked",
                              "storage.options={key: secret-key, secret: hunter2}"])


def finished_run(cfg, tmp_path, metrics_per_task: list[dict]):
    (tmp_path / "results.json").write_text(json.dumps({"methods": {}}))
    tracker = start_tracking(cfg, resume=False)
    for task, metrics in enumerate(metrics_per_task):
        tracker.log_task(task, metrics)
    tracker.finish([str(tmp_path / "results.json"), str(tmp_path / "missing.png")], {"version": 1, "task": 1})
    return tracker


def test_a_run_is_recorded_with_params_metrics_and_artifacts(cfg, tmp_path):
    tracker = finished_run(cfg, tmp_path, [{"loss": 1.1, "accuracy/gmm[pseudo,trie+prior]": 0.9},
                                           {"loss": 0.8, "accuracy/gmm[pseudo,trie+prior]": 0.7}])
    mlflow.set_tracking_uri(default_uri(cfg.output_dir))
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    row = runs.loc[0]
    assert row["metrics.accuracy/gmm/pseudo/trie_prior"] == 0.7 and row["metrics.loss"] == 0.8
    assert row["params.train.lr"] == str(cfg.train.lr) and row["params.scenario.increment"] == "10"
    assert not [name for name in runs.columns if name.startswith("params.storage.options")]  # credentials
    assert "hunter2" not in " ".join(map(str, row.values))
    client = mlflow.MlflowClient()
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.1), (1, 0.8)]
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"results.json", "store"}
    assert (tmp_path / "run" / "mlartifacts").is_dir()  # artifacts beside the store, not in the working dir


def test_a_resumed_experiment_continues_its_unfinished_run(cfg, tmp_path):
    first = start_tracking(cfg, resume=False)
    first.log_task(0, {"loss": 1.0})
    first.fail(RuntimeError("killed driver"))
    second = start_tracking(cfg, resume=True)
    second.log_task(1, {"loss": 0.5})
    second.finish([], None)
    assert second.run_id == first.run_id
    client = mlflow.MlflowClient(default_uri(cfg.output_dir))
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    third = start_tracking(cfg, resume=True)  # nothing unfinished to continue: a new run
    assert third.run_id != first.run_id
    third.finish([], None)


def test_any_tracking_uri_and_tracking_off(tmp_path):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    tracker = open_run(TrackingConfig(uri=uri, experiment="shared"), {"a": {"b": 1}}, "x",
                                str(tmp_path / "run"), "0" * 64, resume=False)
    tracker.finish([], None)
    assert mlflow.MlflowClient(uri).get_run(tracker.run_id).data.params == {"a.b": "1"}
    off = start_tracking(load_config(None, [f"output_dir={tmp_path / 'run'}", "tracking.enabled=false"]), resume=False)
    assert isinstance(off, TrackingOff)
    off.log_task(0, {"loss": 1.0})  # a no-op
    off.finish([], None)
    assert not (tmp_path / "run").exists()


def test_flat_params_and_metric_keys():
    assert flatten({"train": {"lr": 0.002, "workers": [1, 2]}, "name": "x"}) == {
        "train.lr": "0.002", "train.workers": "[1, 2]", "name": "x"}
    assert metric_key("accuracy/gmm[pseudo,trie+prior+prototypes]") == "accuracy/gmm/pseudo/trie_prior_prototypes"
