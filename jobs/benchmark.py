"""Compare GMM's forgetting controls with the baselines in one harness (same features, split, order).

    python jobs/benchmark.py                                   # demo config; modes pseudo, none, exemplar
    python jobs/benchmark.py --modes pseudo none --set scenario.num_classes=50

Each mode is one full experiment (its own output dir under <output_dir>/<mode>); the baselines run
with the first. Prints one table and writes <output_dir>/benchmark.json and benchmark.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.config import load_config  # noqa: E402
from cil_platform.report import format_table, write_report  # noqa: E402

MODES = ("pseudo", "none", "exemplar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args(argv)
    from cil_platform.experiment import run_experiment  # Ray, torch and the model stack: not for --help

    base = load_config(args.config, args.overrides + ["name=benchmark"])
    combined: dict = {"title": "", "methods": {}, "runs": {}}
    for index, mode in enumerate(args.modes):
        cfg = load_config(args.config, args.overrides + [
            "name=benchmark", f"replay.mode={mode}", f"output_dir={base.output_dir}/{mode}",
            *([] if index == 0 else ["baselines=[]"])])
        results = run_experiment(cfg, fresh=True)  # a measurement: never resume an earlier run's progress
        combined["title"] = results["title"]
        combined["methods"].update(results["methods"])
        combined["runs"][mode] = {"seconds": results["seconds"], "output_dir": cfg.output_dir}
    first = load_config(args.config, args.overrides + ["name=benchmark", f"replay.mode={args.modes[0]}",
                                                       f"output_dir={base.output_dir}/{args.modes[0]}"])
    combined["decoding"] = compare_decoders(first)
    write_report(base.output_dir, combined)
    print(format_table(combined))
    for mode, row in combined["decoding"].items():
        print(f"decode={mode}: accuracy {row['accuracy']:.1%} on {row['images']} test images, "
              f"{row['images_per_second']:.1f} images/s on {row['workers']} worker(s)")
    return 0


def compare_decoders(cfg) -> dict:
    """Accuracy and images/s of trie and free decoding with the final projection of a finished run."""
    import time

    from cil_platform.evaluation import evaluate
    from cil_platform.features import features_for
    from cil_platform.storage.store import ProjectionStore
    from cil_platform.training.session import SessionSpec, TrainingSession
    from gmm_model import create_encoder
    from gmm_model.rules import Rule

    store = ProjectionStore(cfg.store_url)
    manifest, weights = store.load(store.versions()[-1])
    encoder = create_encoder(cfg.stack)
    _, test = features_for(cfg, encoder.identity, manifest.seen_classes)
    out = {}
    spec = SessionSpec(name="decoders", stack=cfg.stack, visual_width=encoder.width, cache_dir=cfg.cache_dir,
                       train=cfg.train, storage_url=f"{cfg.output_dir}/decoders")
    with TrainingSession(spec) as session:  # evaluation runs on a session's workers, as in an experiment
        for rule in (Rule.TRIE, Rule.FREE):
            evaluate(session, weights, test.select(manifest.seen_classes[:1]), manifest.seen_classes, [rule],
                     cfg.eval.batch_size)  # warm-up (and the matcher's load, for free decoding)
            start = time.perf_counter()
            predicted = evaluate(session, weights, test, manifest.seen_classes, [rule], cfg.eval.batch_size).labels[rule]
            seconds = time.perf_counter() - start
            correct = sum(p == y for p, y in zip(predicted, test.labels))
            out[rule.value] = {"accuracy": correct / len(test), "images": len(test), "seconds": seconds,
                               "images_per_second": len(test) / seconds, "workers": cfg.train.num_workers}
    return out


if __name__ == "__main__":
    sys.exit(main())
