"""Two Ray nodes on this machine (separate `ray start` processes): `ray job submit` trains with its Ray Train
workers spread over both nodes and gets the metrics of a single-node run with the same seed.

Tolerance: the accuracy matrices (every method, every task) are equal exactly, and every published projection
differs from the single-node one by at most 1e-6 in any weight. Both runs do the same arithmetic (two DDP
workers on gloo, one thread each, the same shards); only where the workers run differs.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import ray
from safetensors.numpy import load as load_safetensors

from cil_platform.config import ExperimentConfig, load_config
from cil_platform.experiment import run_experiment
from cil_platform.storage.store import ProjectionStore
from tests.ray_cluster import local_cluster

REPO = Path(__file__).resolve().parents[1]
WEIGHT_TOLERANCE = 1e-6

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # `make test-slow`: minutes of multi-process runs each

# 2 tasks of 2 QuickDraw classes, 8 training / 4 test drawings each; no baselines (not what this test is about)
OVERRIDES = ["name=two-nodes", "seed=7", "dataset.train_per_class=8", "dataset.test_per_class=4",
             "scenario.num_classes=4", "scenario.increment=2", "train.num_workers=2", "train.threads_per_worker=1",
             "train.batch_size=4", "train.placement_strategy=SPREAD", "baselines=[]"]


def run_single_node(config: ExperimentConfig) -> dict:
    """The reference: the same experiment in this process, on a fresh local single-node Ray."""
    if ray.is_initialized():
        ray.shutdown()
    try:
        return run_experiment(config)
    finally:
        ray.shutdown()


def projections(store_url: str) -> list[dict[str, np.ndarray]]:
    store = ProjectionStore(store_url)
    return [load_safetensors(store.load(version)[1]) for version in store.versions()]


def test_two_node_job_matches_a_single_node_run(tmp_path):
    single = load_config(None, [*OVERRIDES, f"output_dir={tmp_path / 'single'}"])
    reference = run_single_node(single)

    with local_cluster(num_cpus=2, extra_nodes=1) as cluster:
        nodes = set(cluster.wait_for_nodes(2))
        spread_overrides = [*OVERRIDES, f"output_dir={tmp_path / 'cluster'}"]
        job = cluster.submit("python", "jobs/incremental.py", *[arg for o in spread_overrides for arg in ("--set", o)],
                             working_dir=REPO, timeout=1800)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        # Ray's own record of where every training worker ran (dead actors included): one group per fit
        workers = cluster.state("actors", "class_name=RayTrainWorker", detail=True)

    nodes_per_fit = defaultdict(set)
    for worker in workers:
        nodes_per_fit[worker["placement_group_id"]].add(worker["node_id"])
    assert len(nodes_per_fit) == 2, workers  # one fit per task
    assert all(used == nodes for used in nodes_per_fit.values()), nodes_per_fit  # each fit on both nodes

    submitted = json.loads((tmp_path / "cluster" / "results.json").read_text())
    assert submitted["scenario"] == reference["scenario"]
    assert set(submitted["methods"]) == set(reference["methods"])
    for name, row in reference["methods"].items():
        assert submitted["methods"][name]["task_acc"] == row["task_acc"], name
        assert submitted["methods"][name]["overall"] == row["overall"], name

    spread = load_config(None, spread_overrides)  # the job's config, as the job built it
    single_weights, spread_weights = projections(single.store_url), projections(spread.store_url)
    assert len(single_weights) == len(spread_weights) == 2
    for a, b in zip(single_weights, spread_weights):
        assert a.keys() == b.keys()
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= WEIGHT_TOLERANCE
