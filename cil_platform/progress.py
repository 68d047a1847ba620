"""What a run shows on the terminal, and where everything else goes.

The experiment reports to a `Console` it is given: lines (`say`), the task count (`tasks`), the current task's phase
(`phase`) and each finished task (`task_done`). Called as a library the console just prints those lines. Under the
command line, `session()` moves the process's stdout and stderr (file descriptors 1 and 2: Ray's forwarded worker
output, C++ core-worker messages, DeepSpeed, transformers, every logger) into the run's log file, and the console
draws on the terminal alone: the lines, and on a terminal two tqdm bars (tasks with ETA, the current task's phases).
"""
from __future__ import annotations

import io
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

LOG_NAME = "gmm-cil.log"  # in the run's output_dir
# one task, in the order run_task goes through it
PHASES = ("train", "evaluate", "publish", "baselines", "checkpoint")


class Console:
    """The plain console: every line printed as it comes (a library caller, a log, a pipe)."""

    def __init__(self, out: TextIO | None = None):
        self._out = out

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout  # sys.stdout as it is at the time (pytest swaps it)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def tasks(self, total: int, done: int) -> None:
        """The run has `total` tasks, `done` of them completed by an earlier run."""

    def phase(self, name: str) -> None:
        """The current task (or the set-up, before `tasks`) has reached `name`."""

    def task_done(self, line: str) -> None:
        self.say(line)

    def close(self) -> None:
        pass


class BarConsole(Console):
    """A terminal: lines above a bar over the tasks (with ETA) and a bar over the current task's phases."""

    REFRESH_S = 1.0  # tqdm redraws only on updates; a long phase still shows its elapsed time moving

    def __init__(self, out: TextIO):
        super().__init__(out)
        self._tasks: tqdm | None = None
        self._phases: tqdm | None = None
        self._task = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="console-refresh", daemon=True)
        self._ticker.start()

    def _bar(self, **kwargs) -> tqdm:
        try:  # a terminal that reports no size (some ptys) gets a fixed width, else tqdm draws nothing
            sized = os.get_terminal_size(self.out.fileno()).columns > 0
        except (OSError, ValueError, io.UnsupportedOperation):
            sized = False
        return tqdm(file=self.out, mininterval=0, **({"dynamic_ncols": True} if sized else {"ncols": 100}), **kwargs)

    def say(self, text: str) -> None:
        tqdm.write(text, file=self.out)

    def tasks(self, total: int, done: int) -> None:
        self._close_phases()
        self._task = done
        self._tasks = self._bar(total=total, initial=done, desc="tasks", unit="task", position=0,
                                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}")

    def phase(self, name: str) -> None:
        if self._tasks is None:  # setting up: one line saying what it is doing
            if self._phases is None:
                self._phases = self._bar(total=None, position=1, leave=False, bar_format="{desc} [{elapsed}]",
                                         desc=f"setting up: {name}")
            self._phases.set_description_str(f"setting up: {name}", refresh=True)
            return
        if self._phases is None or self._phases.total is None:
            self._close_phases()
            self._phases = self._bar(total=len(PHASES), position=1, leave=False,
                                     desc=f"task {self._task + 1} {name:<10}",
                                     bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} phases [{elapsed}]")
        self._phases.n = PHASES.index(name) if name in PHASES else self._phases.n
        self._phases.set_description_str(f"task {self._task + 1} {name:<10}", refresh=True)

    def task_done(self, line: str) -> None:
        self._close_phases()
        self.say(line)
        self._task += 1
        if self._tasks is not None:
            self._tasks.update(1)
            if self._tasks.n >= self._tasks.total:  # stays on screen, above the summary
                self._tasks.close()
                self._tasks = None

    def _close_phases(self) -> None:
        if self._phases is not None:
            self._phases.close()
            self._phases = None

    def _tick(self) -> None:
        while not self._stop.wait(self.REFRESH_S):
            with tqdm.get_lock():
                for bar in (self._tasks, self._phases):
                    if bar is not None and not bar.disable:
                        bar.refresh(nolock=True)

    def close(self) -> None:
        self._stop.set()
        self._close_phases()
        if self._tasks is not None:
            self._tasks.close()
            self._tasks = None


def log_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOG_NAME


@contextmanager
def session(log_file: str | Path, truncate: bool = False, bars: bool | None = None) -> Iterator[Console]:
    """Within: the process's stdout/stderr (and its children's) append to `log_file`, and the console it yields
    writes to the terminal; `bars` defaults to whether stdout is a terminal. An exception leaving the block is logged with its
    traceback in the file before it propagates (the caller decides what the terminal shows)."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fds = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation):  # no real descriptors (an embedding, pytest's capture)
        fds = None
    if fds is None:
        with open(log_file, "a", buffering=1) as _:
            pass
        yield Console()
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours forwarded worker lines; a file takes none
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    screen = os.fdopen(os.dup(fds[0]), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")
    saved = [os.dup(fd) for fd in fds]
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0), 0o644)
    for fd in fds:
        os.dup2(target, fd)
    os.close(target)
    shown = BarConsole(screen) if (screen.isatty() if bars is None else bars) else Console(screen)
    print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}", flush=True)
    try:
        yield shown
    except BaseException as error:
        traceback.print_exc(file=sys.stderr)  # into the log, whatever the terminal is told
        if hasattr(error, "add_note"):  # Python 3.11+: the caller's error line can point here
            error.add_note(f"log: {log_file}")
        raise
    finally:
        shown.close()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
        screen.close()
