"""Training throughput of the per-task projection update: 1 vs N workers, DDP vs DeepSpeed, in one run.

    python jobs/scaling_benchmark.py                                    # CPU: 1 and 2 workers, both backends
    python jobs/scaling_benchmark.py --workers 1 2 4 --gpu              # one GPU per worker
    python jobs/scaling_benchmark.py --backends deepspeed --set train.deepspeed_config=configs/deepspeed/zero2-fp32-cpu.json

One task is trained exactly as jobs/incremental.py trains it (fit_projection: a Ray Train fit, the frozen
LLM in every worker, pseudo-feature replay of old classes in every batch) on cached QuickDraw
features. Throughput counts new and replayed samples. Two figures per fit:
- steady images/s: samples of the last epoch / that epoch's wall time (the slowest rank), i.e. the
  training steps alone: no worker start-up, LLM load or checkpoint;
- fit images/s: all samples / the whole fit, start-up included (what a short task really costs).
The ratio column divides by the 1-worker figure of the same backend measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil_platform.config import load_config  # noqa: E402
from cil_platform.data import dataset_class_names  # noqa: E402
from cil_platform.class_stats import ClassStatistics  # noqa: E402
from cil_platform.experiment import init_ray  # noqa: E402
from cil_platform.features import features_for  # noqa: E402
from cil_platform.replay import make_memory  # noqa: E402
from cil_platform.training.fit import FitSpec, fit_projection  # noqa: E402
from gmm_model import create_encoder  # noqa: E402


def measure(cfg, train, payload, replay_ratio: float, width: int, workers: int, backend: str, use_gpu: bool) -> dict:
    train_cfg = cfg.train.model_copy(update={"num_workers": workers, "backend": backend, "use_gpu": use_gpu})
    with tempfile.TemporaryDirectory(prefix="scaling-") as storage:  # fresh: a reused run name would resume
        result = fit_projection(FitSpec(name="task-000", features=train, start=None, stack=cfg.stack,
                                        visual_width=width, cache_dir=cfg.cache_dir, train=train_cfg,
                                        storage_url=storage, seed=cfg.seed, replay=payload, replay_ratio=replay_ratio))
    last_epoch_images = result.metrics["images"] * workers  # rank 0's count; every rank runs the same steps
    slowest = max(result.metrics["epoch_seconds_per_worker"])
    return {"backend": backend, "workers": workers, "device": "gpu" if use_gpu else "cpu",
            "steady_images_per_second": last_epoch_images / slowest,
            "fit_images_per_second": result.images / result.seconds, "fit_seconds": result.seconds,
            "loss": result.loss, "peak_rss_mb_per_worker": result.metrics["peak_rss_mb_per_worker"],
            **({"peak_gpu_mb_per_worker": result.metrics["peak_gpu_mb_per_worker"]} if use_gpu else {})}


def format_rows(rows: list[dict]) -> str:
    base = {r["backend"]: r for r in rows if r["workers"] == min(x["workers"] for x in rows)}
    lines = [f"{'backend':<10} {'device':<6} {'workers':>7} {'steady img/s':>13} {'ratio':>6} "
             f"{'fit img/s':>10} {'ratio':>6} {'fit s':>6} {'peak RSS MB/worker':>20}"]
    for r in rows:
        one = base[r["backend"]]
        lines.append(f"{r['backend']:<10} {r['device']:<6} {r['workers']:>7} {r['steady_images_per_second']:>13.1f} "
                     f"{r['steady_images_per_second'] / one['steady_images_per_second']:>6.2f} "
                     f"{r['fit_images_per_second']:>10.1f} "
                     f"{r['fit_images_per_second'] / one['fit_images_per_second']:>6.2f} {r['fit_seconds']:>6.0f} "
                     f"{'/'.join(f'{m:.0f}' for m in r['peak_rss_mb_per_worker']):>20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["ddp", "deepspeed"], choices=["ddp", "deepspeed"])
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    parser.add_argument("--classes", type=int, default=10, help="new classes of the task (as many again are replayed)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["name=scaling", "train.epochs=2", *args.overrides])
    init_ray(cfg.ray_address)
    encoder = create_encoder(cfg.stack)
    names = dataset_class_names(cfg.dataset)
    old, new = names[:args.classes], names[args.classes: 2 * args.classes]
    old_train, _ = features_for(cfg, encoder.identity, old, test_per_class=0)
    train, _ = features_for(cfg, encoder.identity, new, test_per_class=0)
    stats = ClassStatistics()
    stats.learn(old_train)
    memory = make_memory(cfg.replay.mode, stats, cfg.replay.budget, cfg.replay.selection, cfg.seed)
    memory.update(old_train)
    print(f"task: {len(train)} new images of {len(new)} classes, replay {cfg.replay.mode} x{cfg.replay.ratio} "
          f"of {len(old)} old classes; batch {cfg.train.batch_size} per worker, {cfg.train.epochs} epochs, "
          f"{cfg.train.threads_per_worker} thread(s) per worker", flush=True)
    ratio = cfg.replay.ratio if cfg.replay.mode != "none" else 0.0
    rows = [measure(cfg, train, memory.payload(), ratio, encoder.width, workers, backend, args.gpu)
            for backend in args.backends for workers in args.workers]
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
