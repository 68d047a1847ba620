"""The scale-out guarantees, on one small experiment run three ways (every run is minutes, so they share one
reference):

- `gmm-cil run` on a local single-node Ray, as the terminal test runs it (tests/small_run.py): the reference;
- `ray job submit` to a cluster of two Ray nodes (separate `ray start` processes on this machine), the training
  session's workers spread over both: the reference's accuracy matrices exactly, every weight within 1e-6 (the
  same arithmetic, two DDP workers on gloo with one thread each; only where they run differs);
- the job as a plain process beside a busy one (a process spinning on a core), one Ray Train worker SIGKILLed in the
  middle of task 1's update, then the driver SIGKILLed once task 1 is committed and task 2's update has
  checkpointed, then the same command again: it resumes after task 1, restores task 2's update from its
  checkpoint, and ends with the reference's accuracy matrices and weights to the last bit. Load changes task
  timing and Ray Data's delivery order, a kill changes which process computes what; neither may reach a result.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from safetensors.numpy import load as load_safetensors

from cil_platform.paths import REPO_ROOT
from cil_platform.storage.store import ProjectionStore
from tests.ray_cluster import local_cluster
from tests.kills import checkpointed, ray_train_workers, wait_for
from tests.small_run import job_arguments

pytestmark = pytest.mark.e2e

WEIGHT_TOLERANCE = 1e-6


def methods(output_dir: Path) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    return {name: (row["task_acc"], row["overall"]) for name, row in results["methods"].items()}


def projections(output_dir: Path) -> list[dict[str, np.ndarray]]:
    store = ProjectionStore(str(output_dir / "store"))
    return [load_safetensors(store.load(version)[1]) for version in store.versions()]


def assert_same_results(output_dir: Path, reference: Path, weight_tolerance: float) -> None:
    """Every method's accuracy matrix exactly, every published weight within `weight_tolerance`."""
    assert methods(output_dir) == methods(reference)
    ours, theirs = projections(output_dir), projections(reference)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= weight_tolerance


@pytest.fixture(scope="module")
def reference(small_run) -> Path:
    """The output dir of the uninterrupted run."""
    assert small_run.exit_code == 0, small_run.screen[-5000:]
    return small_run.output_dir


def test_a_job_submitted_to_two_nodes_spreads_its_workers_and_matches_the_reference(reference, tmp_path):
    out = tmp_path / "cluster"
    with local_cluster(num_cpus=2, extra_nodes=1) as cluster:
        nodes = set(cluster.wait_for_nodes(2))
        job = cluster.submit("python", "jobs/incremental.py", *job_arguments(out), working_dir=REPO_ROOT, timeout=1800)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        # Ray's own record of where every training worker ran (dead actors included)
        workers = cluster.state("actors", "class_name=RayTrainWorker", detail=True)

    nodes_per_group = defaultdict(set)
    for worker in workers:
        nodes_per_group[worker["placement_group_id"]].add(worker["node_id"])
    assert len(nodes_per_group) == 1, workers  # one training session serves the whole experiment
    assert list(nodes_per_group.values()) == [nodes]  # its two workers on the two nodes
    assert_same_results(out, reference, WEIGHT_TOLERANCE)


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray of its own
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def job_command(output_dir: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "jobs" / "incremental.py"), *job_arguments(output_dir)]


@contextmanager
def a_busy_process():
    """A process spinning on a core at the niceness Ray gives its workers (15): at 0 it left them a few percent of
    the CPU and a small run took many minutes."""
    spinner = subprocess.Popen([sys.executable, "-c", "import os\nos.nice(15)\nwhile True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def kill(process: psutil.Process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_killed_worker_then_a_killed_driver_end_with_the_reference_results(reference, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # the job starts its own Ray
    out, first_log = tmp_path / "killed", tmp_path / "first.log"
    with a_busy_process(), open(first_log, "w") as log:
        first = subprocess.Popen(job_command(out), env=job_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            wait_for(lambda: checkpointed(out / "ray_train", "task-000") or first.poll() is not None, 900,
                     "task 1's update to checkpoint its first epoch")
            workers = ray_train_workers()
            assert first.poll() is None and len(workers) == 2, first_log.read_text()[-3000:]
            kill(workers[0])
            # task 1 committed (store version and run state) and task 2's update checkpointed: the resumed
            # driver's session must restore that checkpoint, not retrain task 2 from task 1's weights
            wait_for(lambda: (out / "run_state" / "task-0000" / "state.json").exists() and
                     checkpointed(out / "ray_train", "task-001") or first.poll() is not None, 900,
                     "task 1 to complete and task 2's update to checkpoint")
            assert first.poll() is None, first_log.read_text()[-3000:]
            kill(psutil.Process(first.pid))
        finally:
            try:  # the killed driver's own Ray processes (its process group only)
                os.killpg(first.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    task1 = [line for line in first_log.read_text().splitlines() if "task 1/2:" in line]
    assert task1 and "resumed from a checkpoint at epoch" in task1[-1], first_log.read_text()[-3000:]
    store = ProjectionStore(str(out / "store"))
    assert store.versions() == [0]
    task1_published = store.manifest(0).created_at

    resumed = subprocess.run(job_command(out), env=job_env(), capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    shown = resumed.stdout
    assert "resuming" in shown and "1 of 2 tasks were completed" in shown, shown[-3000:]
    task2 = [line for line in shown.splitlines() if "task 2/2:" in line]
    assert "task 1/2:" not in shown and task2 and "resumed from a checkpoint at epoch" in task2[-1], shown[-3000:]
    assert store.versions() == [0, 1]
    assert store.manifest(0).created_at == task1_published  # task 1 was neither trained nor published again
    assert_same_results(out, reference, weight_tolerance=0.0)  # one node, the same arithmetic: bit for bit
