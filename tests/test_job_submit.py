"""`ray job submit --working-dir . -- python jobs/incremental.py ...` against a local `ray start --head`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray_cluster import local_cluster

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node in its own processes, its dashboard (the job server) on 127.0.0.1."""
    with local_cluster(num_cpus=2) as cluster:
        yield cluster


def test_job_submit_runs_the_experiment_on_the_cluster(head_node, tmp_path):
    out = tmp_path / "run"
    command = ["python", "jobs/incremental.py",
               "--set", "name=submitted", "--set", f"output_dir={out}",
               "--set", "dataset.train_per_class=8", "--set", "dataset.test_per_class=4",
               "--set", "scenario.num_classes=4", "--set", "scenario.increment=2",
               "--set", "train.num_workers=1", "--set", "train.threads_per_worker=2", "--set", "train.batch_size=8",
               "--set", "replay.mode=exemplar", "--set", "replay.budget=8", "--set", "eval.decode=free",
               "--set", "baselines=[ncm]"]
    done = head_node.submit(*command, working_dir=REPO, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    results = json.loads((out / "results.json").read_text())
    gmm = results["methods"]["gmm[exemplar,free]"]
    assert len(gmm["overall"]) == 2
    assert gmm["memory_bytes"] == 8 * 4 * 1280 * 2  # 8 exemplar feature sets, fp16
    assert sorted(p.name for p in (out / "store").iterdir()) == ["v0000", "v0001"]
