"""The command line (`gmm-cil`, jobs/*.py): every error a user can cause is one `error:` line on stderr with exit
code 2, found before Ray starts; --debug adds the traceback. Each case runs the installed command in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
GMM_CIL = Path(sys.executable).with_name("gmm-cil")


def gmm_cil(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # HF_HUB_OFFLINE: a hub name that is not cached fails at once instead of after the hub client's retries
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.run([str(GMM_CIL), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error(result: subprocess.CompletedProcess, *names: str, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def run_with(tmp_path: Path, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["run", "--set", f"output_dir={tmp_path / 'out'}", *extra]
    for assignment in sets:
        args += ["--set", assignment]
    return gmm_cil(*args, tmp_path=tmp_path)


def test_the_command_is_installed_and_lists_its_commands(tmp_path):
    result = gmm_cil("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("run", "align", "serve", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command, option", [("run", "--fresh"), ("align", "--out"), ("serve", "--store"),
                                             ("bench methods", "--modes")])
def test_each_command_shows_its_own_options(tmp_path, command, option):
    result = gmm_cil(*command.split(), "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: gmm-cil {command}" in result.stdout and option in result.stdout


def test_an_unknown_command_is_a_usage_error(tmp_path):
    assert gmm_cil("train", tmp_path=tmp_path).returncode == 2
    assert gmm_cil("bench", "nothing", tmp_path=tmp_path).returncode == 2
    assert gmm_cil("bench", tmp_path=tmp_path).returncode == 2
    assert gmm_cil("bench", "--help", tmp_path=tmp_path).returncode == 0


def test_an_unknown_config_key_names_the_key_and_its_fix(tmp_path):
    line = assert_one_error(run_with(tmp_path, "train.lrr=1e-3"), "'train.lrr'", "'train.lr'")
    assert "unknown config key" in line
    line = assert_one_error(run_with(tmp_path, "nonsense=1"), "'nonsense'", "remove it")


def test_an_unknown_key_in_a_config_file_too(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\nreplay:\n  modes: pseudo\n")
    assert_one_error(gmm_cil("run", "--config", str(config), tmp_path=tmp_path), "'replay.modes'", "'replay.mode'")


def test_a_missing_config_file_and_a_malformed_override(tmp_path):
    assert_one_error(gmm_cil("run", "--config", "nowhere.yaml", tmp_path=tmp_path), "nowhere.yaml")
    assert_one_error(run_with(tmp_path, "scenario.increment"), "scenario.increment")


def test_an_unknown_preset_or_encoder(tmp_path):
    assert_one_error(run_with(tmp_path, "model=no-such-preset"), "no-such-preset", "offline-small")
    assert_one_error(run_with(tmp_path, "model.encoder=resnet9000"), "model.encoder", "resnet9000")


def test_a_missing_or_malformed_dataset_path(tmp_path):
    assert_one_error(run_with(tmp_path, "dataset.kind=folder", f"dataset.path={tmp_path / 'no-such-dir'}"),
                     "dataset.path", "no-such-dir", "does not exist")
    not_an_archive = tmp_path / "drawings.npz"
    not_an_archive.write_text("not a zip")
    assert_one_error(run_with(tmp_path, f"dataset.path={not_an_archive}"), "drawings.npz", "QuickDraw")
    assert_one_error(run_with(tmp_path, "dataset.kind=parquet", "dataset.path=nosuchproto://bucket/x"),
                     "nosuchproto")


def test_weights_that_cannot_be_fetched(tmp_path):
    assert_one_error(run_with(tmp_path, "model.llm=no-such-org/no-such-llm"), "model.llm", "no-such-org/no-such-llm")
    assert_one_error(run_with(tmp_path, "model.llm=/nowhere/model.gguf"), "model.llm", "/nowhere/model.gguf")


def test_an_output_dir_of_another_config(tmp_path):
    from cil_platform.storage import open_storage
    from cil_platform.storage.run_state import RunState

    out = tmp_path / "out"
    RunState(open_storage(str(out)), "0" * 64).save(0, SimpleNamespace(version=0, sha256="0" * 64), {}, {}, {})
    line = assert_one_error(run_with(tmp_path), "another config", "--fresh")
    assert str(out) in line


def test_debug_shows_the_traceback(tmp_path):
    result = run_with(tmp_path, "train.lrr=1", extra=("--debug",))
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1


def test_the_job_script_behaves_as_the_command(tmp_path):
    """`python jobs/incremental.py` (what `ray job submit` runs) is the same function."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "incremental.py"), "--set", "train.lrr=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_one_error(result, "'train.lrr'")
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "align.py"), "--set", "alignment.epoch=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_one_error(result, "'alignment.epoch'", "'alignment.epochs'")


def test_errors_inside_ray_wrappers_are_found():
    """A worker's error reaches the driver wrapped (Ray task, Ray Train worker group); the line is the worker's."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from cil_platform.cli import explain

    inner = ValueError("cannot load LLM 'x': no config.json\nmore detail")
    wrapped = WorkerGroupError("rank 0 failed", {0: RayTaskError("fit", "Traceback ...", inner)})
    assert explain(wrapped) == ("cannot load LLM 'x': no config.json", 1)
    assert explain(KeyError("a bug")) is None
