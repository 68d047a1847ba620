"""Experiment tracking with MLflow: every run's parameters, per-task metrics and final artifacts.

Default store: SQLite in the run's own directory (`<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`),
so nothing needs a server; `tracking.uri` names any other (an MLflow server `http://...`, `databricks`, another
database). Browse the default one with `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db` (the UI
needs the full `mlflow` package; the run itself needs only `mlflow-skinny`).

A resumed experiment continues its unfinished MLflow run: metrics are stepped by task index, so the history reads as
one run. The experiment opens the run (`start_tracking`), records each task (`log_task`) and ends it (`finish` or `fail`).
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from .config import CREDENTIAL_FIELDS, ExperimentConfig, TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on parameters per request


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 2e-3}} -> {"train.lr": "0.002"}: MLflow parameters are flat strings."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
    return {prefix.rstrip("."): text[:MAX_PARAM_CHARS]}


def metric_key(name: str) -> str:
    """A method name as an MLflow metric key: gmm[pseudo,trie+prior] -> gmm/pseudo/trie_prior."""
    return re.sub(r"[^\w\-./ ]", "_", name.replace("[", "/").replace(",", "/").replace("]", ""))


class Tracker:
    """One MLflow run (through MlflowClient: no process-global active run). Once the run is open, a failure to
    record is a warning: an unreachable tracking server must not cost the experiment."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_task(self, task: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._safely(self.client.log_batch, self.run_id,
                     metrics=[Metric(metric_key(k), float(v), now, task) for k, v in metrics.items()])

    def finish(self, artifacts: list[str], manifest: dict | None) -> None:
        """Log the run's files (results.json, accuracy.png) and the final store manifest; end the run FINISHED."""
        for path in artifacts:
            if Path(path).is_file():
                self._safely(self.client.log_artifact, self.run_id, path)
        if manifest is not None:
            self._safely(self.client.log_dict, self.run_id, manifest, f"store/v{manifest['version']:04d}.json")
        self._end("FINISHED")

    def fail(self, error: BaseException) -> None:
        self._end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def _end(self, status: str) -> None:
        self._safely(self.client.set_terminated, self.run_id, status)

    def _safely(self, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - see the class docstring
            log.warning("MLflow run %s: %s failed: %s", self.run_id, call.__name__, error)


class TrackingOff(Tracker):
    """Tracking disabled: records nothing."""

    def __init__(self):
        super().__init__(None, "")

    def log_task(self, task: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self, artifacts: list[str], manifest: dict | None) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


def default_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def start_tracking(cfg: ExperimentConfig, resume: bool) -> Tracker:
    """The MLflow run of experiment config `cfg` (its `tracking` section): a new run with the config as parameters
    (credentials left out), or (`resume`) the newest unfinished run of the same output_dir and config."""
    if not cfg.tracking.enabled:
        return TrackingOff()
    params = cfg.model_dump(mode="json", exclude=CREDENTIAL_FIELDS)
    return open_run(cfg.tracking, params, cfg.name, cfg.output_dir, cfg.config_hash, resume)


def open_run(settings: TrackingConfig, params: dict, name: str, output_dir: str, config_hash: str,
             resume: bool) -> Tracker:
    from mlflow.entities import Param  # mlflow takes seconds to import: only when a run is tracked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.uri or default_uri(output_dir))
    experiment_name = settings.experiment or name
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        local_artifacts = None if settings.uri else (Path(output_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(experiment_name, artifact_location=local_artifacts)
    else:
        experiment_id = experiment.experiment_id
    tags = {"gmm_cil.output_dir": str(Path(output_dir).resolve()), "gmm_cil.config_hash": config_hash}
    if resume:
        query = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status != 'FINISHED'"])
        unfinished = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        if unfinished:
            client.update_run(unfinished[0].info.run_id, status="RUNNING")
            return Tracker(client, unfinished[0].info.run_id)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for first in range(0, len(flat), BATCH):
        client.log_batch(run_id, params=flat[first:first + BATCH])
    return Tracker(client, run_id)
