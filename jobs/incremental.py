"""Run one class-incremental experiment.

    gmm-cil run                                                  # the demo (configs/demo.yaml)
    gmm-cil run --config my.yaml --set replay.mode=exemplar --set train.lr=5e-4
    ray job submit --working-dir . -- python jobs/incremental.py --set name=on-cluster

Starts Ray locally unless an address is given (--address or $RAY_ADDRESS, as under `ray job submit`).
A run is identified by its output_dir (default runs/<name>): running the same job again resumes after the
last completed task; --fresh starts over (docs/fault_tolerance.md). The terminal shows a header, progress and a
line per task; Ray's, the workers' and the libraries' output go to <output_dir>/gmm-cil.log (docs/cli.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.cli import check_before_ray, header, job_parser, job_terminal, load_checked, run_job  # noqa: E402
from cil_platform.progress import log_path  # noqa: E402
from serve.client import ADMIN_TOKEN_ENV, announcer  # noqa: E402


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(__doc__, prog)
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--announce", metavar="URL", help="a running serve/ app to move to each new version "
                                                          f"(the admin token from ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the progress saved in output_dir instead of resuming after its last task")
    return run_job(parser, argv, run)


def run(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f"ray_address={args.address}"] if args.address else [])
    config = load_checked(args.config, overrides)
    log = log_path(config.output_dir)
    with job_terminal(log, args.verbose, truncate=args.fresh) as shown:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_before_ray(config, fresh=args.fresh)
        shown.say(header(config, None if args.verbose else log))
        from cil_platform.experiment import run_experiment  # loads Ray and the model stack: after the checks

        run_experiment(config, fresh=args.fresh, console=shown,
                       on_publish=announcer(args.announce, os.environ.get(ADMIN_TOKEN_ENV)) if args.announce else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
