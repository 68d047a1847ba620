"""Run one class-incremental experiment.

    python jobs/incremental.py                                   # the demo (configs/demo.yaml)
    python jobs/incremental.py --config my.yaml --set replay.mode=exemplar --set train.lr=5e-4
    ray job submit --working-dir . -- python jobs/incremental.py --set name=on-cluster

Starts Ray locally unless an address is given (--address or $RAY_ADDRESS, as under `ray job submit`).
A run is identified by its output_dir (default runs/<name>): running the same job again resumes after the
last completed task; --fresh starts over (docs/fault_tolerance.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.config import load_config  # noqa: E402
from cil_platform.experiment import run_experiment  # noqa: E402
from cil_platform.storage.run_state import ConfigMismatchError  # noqa: E402
from serve.client import TOKEN_ENV, announcer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set scenario.increment=5 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--announce", metavar="URL", help="a running serve/ app to move to each new version "
                                                          f"(bearer token from ${TOKEN_ENV})")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the progress saved in output_dir instead of resuming after its last task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = args.overrides + ([f"ray_address={args.address}"] if args.address else [])
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        run_experiment(config, fresh=args.fresh,
                       on_publish=announcer(args.announce, os.environ.get(TOKEN_ENV)) if args.announce else None)
    except ConfigMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
