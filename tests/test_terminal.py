"""What a run shows on the terminal: a header, two progress bars, a line per task; everything else (Ray, its
workers, the libraries) goes to the run's log file. The session is checked on a small script; the real thing on a
small experiment through `gmm-cil run` on a pseudo-terminal (e2e; tests/small_run.py)."""
from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest

from tests.small_run import on_a_terminal
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"^(tasks \d+/\d+ \||task \d+ \w+ +\||setting up: )")
NOISE = ("WARNING", "Warning", "Traceback", "PlacementGroupCleaner")


def shown_lines(screen: str) -> tuple[list[str], list[str]]:
    """(text lines, progress-bar renders) as a terminal leaves them: what follows a line's last carriage return."""
    text, bars = [], []
    for raw in screen.replace("\r\n", "\n").split("\n"):
        line = ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if line:
            (bars if BAR.match(line) else text).append(line)
    return text, bars


def test_the_session_moves_all_output_to_the_log(tmp_path):
    """print, logging, a raw write to fd 2 and a child process go to the log; the console's lines to the terminal."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import logging, os, subprocess, sys, time
        from cil_platform.progress import session
        with session({str(tmp_path / 'run' / 'x.log')!r}) as shown:
            logging.basicConfig(level=logging.INFO)
            print("a print"); logging.getLogger("lib").warning("a library warning")
            os.write(2, b"a raw write to fd 2\\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"])
            shown.say("header line")
            shown.phase("starting")
            shown.tasks(2, 0)
            for task in range(2):
                for phase in ("train", "evaluate", "publish"):
                    shown.phase(phase)
                shown.task_done(f"task {{task + 1}}/2: done")
        print("after the session")
    """))
    code, screen = on_a_terminal([sys.executable, str(script)], tmp_path, 60)
    assert code == 0, screen
    text, bars = shown_lines(screen)
    assert text == ["header line", "task 1/2: done", "task 2/2: done", "after the session"], screen
    assert any(b.startswith("tasks 2/2") for b in bars) and any(b.startswith("task 1 train") for b in bars), bars
    log = (tmp_path / "run" / "x.log").read_text()
    for expected in ("a print", "a library warning", "a raw write to fd 2", "a child process"):
        assert expected in log
    assert "header line" not in log and "after the session" not in log


def test_without_a_terminal_the_console_prints_lines_only(tmp_path):
    from cil_platform.progress import Console

    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        shown = Console(stream)
        shown.tasks(2, 1)
        shown.phase("train")
        shown.task_done("task 2/2: done")
    assert out.read_text() == "task 2/2: done\n"


@pytest.mark.e2e
def test_a_small_run_shows_a_clean_terminal_and_logs_the_rest(small_run):
    out, screen = small_run.output_dir, small_run.screen
    assert small_run.exit_code == 0, screen[-5000:]
    text, bars = shown_lines(screen)
    noisy = [line for line in text + bars if any(word in line for word in NOISE)]
    assert not noisy, noisy
    assert text[0].startswith("GMM-CIL small-run") and any(line.startswith("log ") for line in text[:6]), text
    task_lines = [line for line in text if line.startswith("task ")]
    assert [line.split(":")[0] for line in task_lines] == ["task 1/2", "task 2/2"], text
    # header (5) + features line + a line per task + the table (2 + a row per method) + the files written
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert len(text) == 5 + 1 + 2 + 2 + len(methods) + 1, text
    assert any(b.startswith("tasks 1/2") for b in bars) and any(b.startswith("task 2 train") for b in bars), bars
    log = (out / "gmm-cil.log").read_text()
    assert "RayTrainWorker" in log and "Started training worker group" in log  # the workers' output, forwarded
    assert "Failed to query Ray Train Controller actor state" not in log  # its cause is gone, not just hidden
    assert "Loading weights" not in log  # transformers' bars are off in every worker
    assert "de-quantizing GGUF" not in log  # and in the driver's one-time de-quantisation (a fresh cache)
    assert (out / "results.json").is_file()
    # the same run, recorded in MLflow (cil_platform/tracking.py): a metric per method and task, the artifacts
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("small-run").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["scenario.increment"] == "2"
    expected = {"loss", "train_seconds", "eval_seconds", "accuracy/ncm", "accuracy/gmm/pseudo/trie_prior"}
    assert expected <= set(run.data.metrics), run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/ncm")] == [0, 1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"results.json", "accuracy.png", "store"}
