"""Zero-shot naming: how well a starting (stage-1) projection names classes it was never aligned or trained on.

    python jobs/zero_shot.py --projection assets/aligned/1b73d88d6e5b.safetensors
    python jobs/zero_shot.py --projection A.safetensors --projection B.safetensors --seeds 0 1 2 --out runs/zs

The premise of stage 1 is that an aligned model can already name classes before any task teaches them. This
measures it: the pool is every class of the experiment's dataset that none of the given projections saw (the
union of the classes in their metadata), so all are compared on the same unseen classes. Each seed draws a
permutation of the pool: its first `--ways-large` classes are one large problem, its first `--episodes` x
`--ways-small` classes, in groups, are as many small ones (the same test images, so one feature pass serves both).
Images are decoded with the plain `trie` rule over the candidate names: no prior, no prototypes, nothing learned
about the classes. Prints one row per projection (mean ± sd over seeds); --out writes results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def draws(pool: list[str], seed: int, large: int, small: int, episodes: int) -> dict[str, list[list[str]]]:
    """{"large": [classes], "small": [classes of each episode]} from one seeded permutation of the sorted pool;
    the small episodes are disjoint and lie inside the large draw when episodes * small <= large."""
    if max(large, small * episodes) > len(pool):
        raise ValueError(f"{max(large, small * episodes)} classes wanted but the pool has only {len(pool)}")
    order = [sorted(pool)[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    return {"large": [order[:large]], "small": [order[i * small:(i + 1) * small] for i in range(episodes)]}


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else float("nan")


def mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{100 * float(np.mean(values)):.1f} ± {100 * sd:.1f}"


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from cil_platform.alignment import read_aligned
    from cil_platform.config import load_config
    from cil_platform.data import dataset_class_names
    from cil_platform.experiment import init_ray
    from cil_platform.features import features_for
    from gmm_model import create_encoder, create_gmm
    from gmm_model.classify import classify
    from gmm_model.rules import Rule

    cfg = load_config(args.config, args.overrides)
    projections = {path: read_aligned(path) for path in args.projection}
    seen = set().union(*(set(p.classes) for p in projections.values()))
    init_ray(cfg.ray_address)
    try:
        encoder = create_encoder(cfg.stack)
        pool = [c for c in dataset_class_names(cfg.dataset) if c not in seen]
        per_seed = {seed: draws(pool, seed, args.ways_large, args.ways_small, args.episodes) for seed in args.seeds}
        needed = sorted({c for d in per_seed.values() for group in d.values() for classes in group for c in classes})
        _, test = features_for(cfg, encoder.identity, needed)
    finally:
        ray.shutdown()
    torch.set_num_threads(args.threads)
    gmm, results = None, {"pool": len(pool), "seen_by_projections": len(seen), "seeds": args.seeds,
                          "test_images_per_class": cfg.dataset.test_per_class, "projections": {}}
    for path, aligned in projections.items():
        if gmm is None:
            gmm = create_gmm(cfg.stack, encoder.width, cfg.cache_dir, projection=aligned.weights).eval()
        else:
            gmm.projection.load_bytes(aligned.weights)
        row, start = {"classes_aligned_on": len(aligned.classes)}, time.perf_counter()
        for size, ways in (("large", args.ways_large), ("small", args.ways_small)):
            scores = []
            for seed in args.seeds:
                correct = []
                for classes in per_seed[seed][size]:
                    part = test.select(classes)
                    visual = torch.from_numpy(part.features.astype(np.float32))
                    with torch.no_grad():
                        labels = [p.label for s in range(0, len(part), cfg.eval.batch_size)
                                  for p in classify(gmm, visual[s:s + cfg.eval.batch_size], classes, Rule.TRIE)]
                    correct.append(accuracy(labels, [str(t) for t in part.labels]))
                scores.append(float(np.mean(correct)))
            row[f"{ways}-way"] = scores
            print(f"{Path(path).name}: {ways}-way {mean_sd(scores)} % (seeds {args.seeds}: "
                  + ", ".join(f"{100 * s:.1f}" for s in scores) + ")", flush=True)
        row["seconds"] = round(time.perf_counter() - start)
        results["projections"][path] = row
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projection", action="append", required=True, help="an aligned .safetensors (repeatable)")
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ways-large", type=int, default=100)
    parser.add_argument("--ways-small", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=5, help="small episodes per seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="directory for results.json")
    args = parser.parse_args(argv)
    results = run(args)
    print(f"pool: {results['pool']} classes no projection saw; chance {100 / args.ways_small:.0f} % "
          f"({args.ways_small}-way), {100 / args.ways_large:.0f} % ({args.ways_large}-way)")
    for path, row in results["projections"].items():
        print(f"| {Path(path).name} | {row['classes_aligned_on']} | {mean_sd(row[f'{args.ways_small}-way'])} | "
              f"{mean_sd(row[f'{args.ways_large}-way'])} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
