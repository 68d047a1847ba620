"""`gmm-cil`: one command for the jobs and the service. A package of its own because it sits above every layer:
it dispatches to jobs/ and serve/, which cil_platform must not import (tests/test_architecture.py).

Each subcommand is the same function that `python jobs/<job>.py` / `python -m serve.<module>` runs, given the
rest of the command line; `gmm-cil <command> --help` shows that command's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# command -> (module, what it does); bench has its own sub-command: what to benchmark
COMMANDS = {
    "run": ("jobs.incremental", "run (or resume) a class-incremental experiment"),
    "align": ("jobs.align", "train a stack's stage-1 aligned projection"),
    "serve": ("serve.launch", "serve a projection store over HTTP (127.0.0.1:8000)"),
    "bench": (None, "benchmarks: methods (forgetting controls vs baselines), scaling (workers, backends), "
                    "serving (load across a version swap)"),
}
BENCHMARKS = {
    "methods": "jobs.benchmark",
    "scaling": "jobs.scaling_benchmark",
    "serving": "serve.bench",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmm-cil", description="GMM-CIL: class-incremental learning with a generative multi-modal model, on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<7} {text}" for name, (_, text) in COMMANDS.items())
               + "\n\n`gmm-cil COMMAND --help` for a command's options; docs/cli.md")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    args = parser.parse_args(argv)
    module, prog, rest = COMMANDS[args.command][0], f"gmm-cil {args.command}", args.args
    if args.command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            parser.exit(0 if rest[:1] in (["-h"], ["--help"]) else 2,
                        f"usage: gmm-cil bench {{{','.join(BENCHMARKS)}}} [options]\n"
                        + "".join(f"  {name:<8} python -m {mod}\n" for name, mod in BENCHMARKS.items()))
        module, prog, rest = BENCHMARKS[rest[0]], f"{prog} {rest[0]}", rest[1:]
    if args.debug and args.command in ("run", "align"):  # they take --debug themselves
        rest = ["--debug", *rest]
    return invoke(importlib.import_module(module).main, rest, prog, args.debug)


def invoke(entry: Callable[..., int | None], argv: list[str], prog: str, debug: bool = False) -> int:
    """Call a job's main with its arguments; its argparse names itself `prog` (it reads sys.argv[0])."""
    from cil_platform.cli import guarded

    saved, sys.argv = sys.argv, [prog, *argv]
    try:
        return guarded(lambda: entry(argv), debug)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
