"""`ray job submit --working-dir . -- python jobs/incremental.py ...` against a local `ray start --head`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node in its own processes, its dashboard (the job server) on 127.0.0.1."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    dashboard = free_port()
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


def test_job_submit_runs_the_experiment_on_the_cluster(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "run"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "jobs/incremental.py",
               "--set", "name=submitted", "--set", f"output_dir={out}",
               "--set", "dataset.train_per_class=8", "--set", "dataset.test_per_class=4",
               "--set", "scenario.num_classes=4", "--set", "scenario.increment=2",
               "--set", "train.num_workers=1", "--set", "train.threads_per_worker=2", "--set", "train.batch_size=8",
               "--set", "replay.mode=exemplar", "--set", "replay.budget=8", "--set", "eval.decode=free",
               "--set", "eval.actors=1", "--set", "baselines=[ncm]"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    results = json.loads((out / "results.json").read_text())
    gmm = results["methods"]["gmm[exemplar,free]"]
    assert len(gmm["overall"]) == 2
    assert gmm["memory_bytes"] == 8 * 4 * 1280 * 2  # 8 exemplar feature sets, fp16
    assert sorted(p.name for p in (out / "store").iterdir()) == ["v0000", "v0001"]
