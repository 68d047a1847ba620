"""Real contention for concurrency tests: processes that each set up, wait for one shared go signal, then run
their body at the same moment and report one line; they stay alive (holding whatever they took) until released."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cil_platform.paths import REPO_ROOT

PRELUDE = """
import pathlib, sys, time
go = pathlib.Path(sys.argv[1])
{setup}
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
{body}
sys.stdin.read()  # hold on until the test lets go
"""


def race(workdir: Path, setup: str, bodies: list[str], timeout: float = 120) -> list[str]:
    """Run one process per body (each after `setup`), all released at once; returns the last line each printed
    before the test let go. The processes exit when this returns."""
    go = workdir / "go"
    processes = [subprocess.Popen([sys.executable, "-c", PRELUDE.format(setup=setup, body=body), str(go)],
                                  cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for body in bodies]
    try:
        for process in processes:
            line = process.stdout.readline().strip()
            assert line == "ready", line + process.stderr.read()
        go.touch()
        results = []
        for process in processes:
            line = process.stdout.readline().strip()
            assert line, process.stderr.read()
            results.append(line)
        return results
    finally:
        for process in processes:
            process.stdin.close()
            process.wait(timeout=timeout)
