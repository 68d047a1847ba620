"""One driver per run directory: the lease open_run_state takes (cil_platform/storage/lease.py), with real processes."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from cil_platform.paths import REPO_ROOT
from cil_platform.storage import open_storage
from cil_platform.storage.lease import LEASE_FILE, RunLeaseError, acquire_lease
from cil_platform.storage.run_state import open_run_state
from tests.racing import race

HASH = "a" * 64
DRIVER = """
import sys
from cil_platform.storage.lease import RunLeaseError
from cil_platform.storage.run_state import open_run_state
"""


def opening(out) -> str:
    """A driver's first step: open the run state of `out` (taking its lease), and say whether it got it."""
    return f"""
try:
    state = open_run_state({str(out)!r}, None, {HASH!r})
    print("held", flush=True)
except RunLeaseError as error:
    print("refused:", error, flush=True)
"""


def test_of_two_concurrent_drivers_on_one_output_dir_one_runs_and_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    results = race(tmp_path, DRIVER, [opening(out), opening(out)])
    assert sorted(r.split(":")[0] for r in results) == ["held", "refused"], results
    refused = next(r for r in results if r.startswith("refused"))
    assert "in use by another driver (pid" in refused and socket.gethostname() in refused
    assert "give this run another name / output_dir" in refused
    assert not (out / LEASE_FILE).exists()  # both exited: the holder released it


def test_a_lease_of_a_killed_driver_on_this_host_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", DRIVER + opening(out) + "sys.stdin.read()"],
                              cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLeaseError, match=f"pid {holder.pid} on host"):
            open_run_state(str(out), None, HASH)
        holder.send_signal(signal.SIGKILL)  # no exit handler runs: the lease file stays
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert json.loads((out / LEASE_FILE).read_text())["pid"] == holder.pid
    state = open_run_state(str(out), None, HASH)
    assert json.loads((out / LEASE_FILE).read_text())["token"] == state.lease.holder["token"]
    state.release()
    assert not (out / LEASE_FILE).exists()


def test_a_lease_held_on_another_host_or_unreadable_is_refused_not_broken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lease = out / LEASE_FILE
    lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunLeaseError, match="pid 1 on host elsewhere.*delete the lease file"):
        open_run_state(str(out), None, HASH)
    for garbage in (b"\x00\xff", b"[1, 2]", b'{"host": 3}'):
        lease.write_bytes(garbage)
        with pytest.raises(RunLeaseError, match=r"pid \? on host"):
            open_run_state(str(out), None, HASH)
        assert lease.read_bytes() == garbage


def test_the_holding_process_may_open_its_run_again_and_an_earlier_release_leaves_the_new_lease(tmp_path):
    first = open_run_state(str(tmp_path), None, HASH)
    second = open_run_state(str(tmp_path), None, HASH)  # the command line's check, then the experiment
    first.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == second.lease.holder["token"]
    second.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_refused_open_changes_nothing_and_a_config_error_releases_the_lease(tmp_path):
    from types import SimpleNamespace

    from cil_platform.storage.run_state import ConfigMismatchError, RunState

    RunState(open_storage(str(tmp_path)), "b" * 64).save(0, SimpleNamespace(version=0, sha256="0" * 64), {}, {}, {})
    (tmp_path / LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 7}))
    before = (tmp_path / LEASE_FILE).read_text()
    with pytest.raises(RunLeaseError):
        open_run_state(str(tmp_path), None, HASH, fresh=True)  # --fresh does not discard a running driver's state
    assert (tmp_path / LEASE_FILE).read_text() == before and (tmp_path / "run_state").exists()
    (tmp_path / LEASE_FILE).unlink()
    with pytest.raises(ConfigMismatchError):
        open_run_state(str(tmp_path), None, HASH)
    assert not (tmp_path / LEASE_FILE).exists()


def test_the_lease_on_s3_is_create_only(s3_bucket):
    run = s3_bucket.storage("run")
    lease = acquire_lease(run)
    other = {"host": "elsewhere", "pid": 9, "token": "another driver's"}
    run.fs.pipe_file(f"{run.path}/{LEASE_FILE}", json.dumps({**lease.holder, **other}).encode())
    with pytest.raises(RunLeaseError, match="elsewhere"):
        acquire_lease(open_storage(s3_bucket.url("run"), s3_bucket.options))
    lease.release()  # not its token any more: the other driver's lease stays
    assert s3_bucket.keys("run") == [LEASE_FILE]
    run.fs.rm(f"{run.path}/{LEASE_FILE}")
    again = acquire_lease(run)
    again.release()
    assert s3_bucket.keys("run") == []
