"""Stage-1 alignment: train a stack's starting projection on classes no experiment evaluates on.

    python jobs/align.py                     # offline stack -> assets/aligned/<fingerprint>.safetensors
    python jobs/align.py --set alignment.epochs=3 --out /tmp/aligned.safetensors

Experiments read the result (shipped or cached) and draw their classes only from the other classes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.alignment import align_projection, default_aligned_path, write_aligned  # noqa: E402
from cil_platform.config import load_config  # noqa: E402
from cil_platform.data import dataset_class_names  # noqa: E402
from cil_platform.experiment import init_ray  # noqa: E402
from gmm_model import create_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="where to write (default: the shipped path for the stack)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.ray_address)
    start = time.perf_counter()
    encoder = create_encoder(cfg.stack)
    aligned = align_projection(cfg, dataset_class_names(cfg.dataset), encoder.width, encoder.identity)
    out = args.out or str(default_aligned_path(cfg.stack, cfg.cache_dir)[0])
    write_aligned(out, aligned.weights, aligned.classes, cfg.stack, f"jobs/align.py on {cfg.dataset.kind}")
    print(f"aligned projection on {len(aligned.classes)} classes -> {out} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
