"""Stage-1 alignment: train a stack's starting projection on classes no experiment evaluates on.

    gmm-cil align                            # offline stack -> assets/aligned/<fingerprint>.safetensors
    gmm-cil align --set alignment.epochs=3 --out /tmp/aligned.safetensors
    gmm-cil align --set alignment.dataset.kind=folder --set alignment.dataset.path=$HOME/.cache/gmm-cil/corpora/clipart
        --set alignment.dataset.test_fraction=0 --set alignment.num_classes=null --set alignment.epochs=3
        --out assets/aligned/1b73d88d6e5b-clipart.safetensors   # (one line) on scripts/build_alignment_corpus.py's
                                                                # clip-art corpus
    python jobs/align.py ...                 # the same, e.g. under `ray job submit --working-dir .`

Experiments read the result (shipped or cached) and draw their classes only from the other classes.
Beside the file, <out>.json records what it was aligned on (dataset, classes, corpora and their licences).
Ray's and the libraries' output go to <output_dir>/gmm-cil-align.log.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.cli import check_before_ray, job_parser, job_terminal, load_checked, run_job  # noqa: E402


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(__doc__, prog)
    parser.add_argument("--out", help="where to write (default: the shipped path for the stack)")
    return run_job(parser, argv, run)


def run(args: argparse.Namespace) -> int:
    cfg = load_checked(args.config, args.overrides)
    log = Path(cfg.output_dir) / "gmm-cil-align.log"
    with job_terminal(log, args.verbose) as shown:
        check_before_ray(cfg, run_state=False)
        corpus = cfg.alignment.dataset or cfg.dataset
        shown.say(f"aligning {cfg.stack.encoder} -> {cfg.stack.llm} on {cfg.alignment.num_classes or 'all'} classes "
                  f"of {corpus.kind} {corpus.path or ''}".rstrip()
                  + ("" if args.verbose else f"; log {log}"))
        from cil_platform.alignment import align_projection, default_aligned_path, write_aligned, write_sidecar  # Ray
        from cil_platform.data import dataset_class_names
        from cil_platform.experiment import init_ray
        from gmm_model import create_encoder

        init_ray(cfg.ray_address)
        start = time.perf_counter()
        shown.phase("encoder")
        encoder = create_encoder(cfg.stack)
        shown.phase("features and training")
        aligned = align_projection(cfg, dataset_class_names(cfg.dataset), encoder.width, encoder.identity)
        out = args.out or str(default_aligned_path(cfg.stack, cfg.cache_dir)[0])
        write_aligned(out, aligned.weights, aligned.classes, cfg.stack, f"jobs/align.py on {corpus.kind}")
        write_sidecar(out, cfg, aligned, seconds=round(time.perf_counter() - start))
        shown.say(f"aligned projection on {len(aligned.classes)} classes -> {out} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
