"""The data plane at scale: driver memory and training rate with 10 k, 100 k and 1 M cached images, in one run.

    python jobs/scale_benchmark.py                                  # 10 k, 100 k, 1 M images
    python jobs/scale_benchmark.py --sizes 10000 100000 --classes 100 --task-images 240

The LLM is de-quantised first, once, so that no size's driver pays it. Then for each size, a fresh driver process
(so its peak RSS is its own):
1. generates a synthetic feature cache with Ray Data: `ray.data.range(N)` cut into shards, each written by a Ray
   Data task in the cache's format (features.py: safetensors, sha256, stamps) with the demo's token shape
   (4 tokens x 1280, float16: 10 KB an image; 1 M images = 10 GB). Images are listed class by class, as the
   dataset loaders list them; class c's tokens are a seeded mean plus unit noise. The driver keeps what an
   experiment's driver keeps of a listing: each image's key bytes and class code.
2. indexes the cache (a Ray Data pass that reads and verifies every shard) and builds the streamed FeatureSet;
3. learns the class statistics of every image (ClassStatistics.learn: a Ray Data stream of batches, float64 sums);
4. starts a training session (the config's workers) and runs one update of `--task-images` images of the first
   `--task-classes` classes with pseudo replay of the others, each worker reading its rows from the cache itself;
5. evaluates the trained projection on `--eval-images` images of those classes on the same workers.
It prints each stage's seconds and the driver's RSS after it, the peak RSS (getrusage), the update's samples/s over
its optimizer steps and its workers' read time; then, over all sizes, the ratios to the smallest size. The cache is
deleted after each size (`--keep` keeps it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

TOKENS, WIDTH = 4, 1280  # the demo stack's visual tokens (offline-small: 2x2 grid of EfficientNet-Lite0)


def synthetic_shard(batch: dict, cache, classes: int, per_class: int) -> dict:
    """Ray Data map: rows `batch["id"]` as one cache shard (class-major ids: class = id // per_class)."""
    from cil_platform.features import key_bytes

    ids = batch["id"].astype(np.int64)
    codes = np.minimum(ids // per_class, classes - 1)
    keys = [hashlib.sha1(f"synthetic:{i}".encode()).hexdigest() for i in ids.tolist()]
    features = np.empty((len(ids), TOKENS, WIDTH), np.float16)
    for code in np.unique(codes):
        rows = codes == code
        mean = np.random.default_rng([7, int(code)]).standard_normal((TOKENS, WIDTH), dtype=np.float32)
        noise = np.random.default_rng([8, int(ids[rows][0])]).standard_normal((int(rows.sum()), TOKENS, WIDTH),
                                                                               dtype=np.float32)
        features[rows] = mean + noise
    cache.add(keys, features)
    return {"key": key_bytes(keys), "code": codes.astype(np.int32)}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PrivatePeak(threading.Thread):
    """The driver's peak private memory (USS: pages no other process shares), sampled every `every` s. RSS also
    counts the pages of Ray's shared-memory object store that the driver has mapped while reading blocks; USS is the
    driver's own heap."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.peak, self.stopped = every, 0.0, threading.Event()

    def run(self) -> None:
        process = psutil.Process()
        while not self.stopped.wait(self.every):
            self.peak = max(self.peak, process.memory_full_info().uss / 2**20)


def one_size(args) -> dict:
    """Stages 1-5 for `args.one` images in this process; returns the figures."""
    import ray

    from cil_platform.class_stats import ClassStatistics
    from cil_platform.config import load_config
    from cil_platform.data import dataset_class_names
    from cil_platform.evaluation import evaluate
    from cil_platform.experiment import init_ray
    from cil_platform.features import FeatureCache, FeatureSet
    from cil_platform.training.session import SessionSpec, TrainingSession
    from gmm_model.rules import Rule

    cfg = load_config(args.config, args.overrides)
    size, figures, stage_start = args.one, {"images": args.one, "stages": {}}, time.perf_counter()

    def stage(name: str) -> None:
        nonlocal stage_start
        now = time.perf_counter()
        uss = psutil.Process().memory_full_info().uss / 2**20
        figures["stages"][name] = {"seconds": round(now - stage_start, 1), "rss_mb": round(rss_mb()),
                                   "uss_mb": round(uss)}
        print(f"  [{size}] {name}: {now - stage_start:.1f} s, driver RSS {rss_mb():.0f} MB, private {uss:.0f} MB",
              flush=True)
        stage_start = now

    sampler = PrivatePeak()
    sampler.start()
    init_ray(cfg.ray_address)
    names = [f"{c}" for c in dataset_class_names(cfg.dataset)][: args.classes]
    figures["rss_start_mb"] = round(rss_mb())
    cache = FeatureCache(args.dir, "synthetic-demo-shape")
    per_class = -(-size // args.classes)
    listed = ray.data.range(size, override_num_blocks=max(1, size // args.shard_rows)).map_batches(
        synthetic_shard, fn_kwargs={"cache": cache, "classes": args.classes, "per_class": per_class},
        batch_size=args.shard_rows, batch_format="numpy")
    keys, codes = [], []
    for batch in listed.iter_batches(batch_size=None, batch_format="numpy"):
        keys.append(batch["key"])
        codes.append(batch["code"])
    keys, codes = np.concatenate(keys), np.concatenate(codes)
    stage("generate")
    index = cache.index()
    rows = FeatureSet.of(cache, index, keys, codes, names)
    del keys, codes
    figures["shards"] = len(index.shards)
    stage("index")
    stats = ClassStatistics()
    stats.learn(rows)
    figures["stats_images_per_second"] = round(size / (time.perf_counter() - stage_start))
    stage("class statistics")
    task_classes = names[: args.task_classes]
    task = rows.select(task_classes)
    take = np.zeros(len(task), bool)
    for code in np.unique(task.codes):  # the first task-images / task-classes rows of each class
        take[np.flatnonzero(task.codes == code)[: args.task_images // args.task_classes]] = True
    task = task.subset(take)
    old = [c for c in stats.classes if c not in task_classes]  # replayed: pseudo-features of the other classes
    replay = {"mode": "pseudo", "classes": old, "mean": stats.matrix("mean", old), "std": stats.matrix("std", old)}
    with tempfile.TemporaryDirectory(prefix="scale-") as storage:
        spec = SessionSpec(name="scale", stack=cfg.stack, visual_width=WIDTH, cache_dir=cfg.cache_dir,
                           train=cfg.train, storage_url=storage)
        with TrainingSession(spec) as session:
            result = session.fit("task-000", task, None, seed=0, replay=replay, replay_ratio=cfg.replay.ratio)
            stage("train (session start-up included)")
            steps = result.metrics["steps_seconds"]
            figures["train"] = {"samples": result.images, "steps_seconds": round(steps, 1),
                                "samples_per_second": round(result.images / steps, 2),
                                "worker_setup_seconds": round(result.metrics["setup_seconds"], 1),
                                "driver_seconds": round(result.seconds, 1)}
            test = rows.select(task_classes)
            test = test.subset(np.arange(len(test)) % max(1, len(test) // args.eval_images) == 0)
            evaluated = evaluate(session, result.projection, test, task_classes, [Rule.TRIE], cfg.eval.batch_size)
            accuracy = float(np.mean(np.asarray(evaluated.labels[Rule.TRIE]) == test.labels))
            figures["eval"] = {"images": len(test), "accuracy": round(accuracy, 3)}
            stage("evaluate")
    figures["peak_rss_mb"] = round(peak_rss_mb())
    sampler.stopped.set()
    figures["peak_uss_mb"] = round(sampler.peak)
    figures["load_average"] = round(os.getloadavg()[0], 2)
    ray.shutdown()
    return figures


def prepare_stack(args) -> None:
    """De-quantise the LLM before any size runs (once per machine): else the first size's driver pays it, in seconds
    and in RSS, and every ratio to that size reads too small."""
    from cil_platform.config import load_config
    from gmm_model.llm import prepare_llm

    cfg = load_config(args.config, args.overrides)
    prepare_llm(cfg.stack.llm, cfg.cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shard-rows", type=int, default=2000, help="images per synthetic cache shard (20 MB)")
    parser.add_argument("--task-classes", type=int, default=10)
    parser.add_argument("--task-images", type=int, default=240, help="the demo's task: 10 classes x 24")
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--root", default=None, help="where the synthetic caches go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep each size's cache")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size, figures as JSON
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("FIGURES " + json.dumps(one_size(args)), flush=True)
        return 0
    root = Path(args.root or tempfile.mkdtemp(prefix="scale-benchmark-"))
    results = []
    prepare_stack(args)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    for size in args.sizes:
        directory = root / f"cache-{size}"
        command = [sys.executable, __file__, "--one", str(size), "--dir", str(directory),
                   *sum((["--set", o] for o in args.overrides), []), *(["--config", args.config] if args.config else []),
                   *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                     ("classes", "shard_rows", "task_classes", "task_images", "eval_images")]]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        finally:
            if not args.keep:
                shutil.rmtree(directory, ignore_errors=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("FIGURES ")]
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("  [")), flush=True)
        if done.returncode or not lines:
            print(f"size {size} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            return 1
        results.append(json.loads(lines[-1].removeprefix("FIGURES ")))
    report(results)
    return 0


def report(results: list[dict]) -> None:
    base = results[0]
    print(f"\n{'images':>9} {'shards':>6} {'GB':>6} {'peak RSS MB':>11} {'x':>5} {'peak private MB':>15} {'x':>5} "
          f"{'stats img/s':>11} "
          f"{'train samples/s':>15} {'x':>5} {'worker read s':>13} {'eval acc':>8} {'load':>5}")
    for r in results:
        gigabytes = r["images"] * TOKENS * WIDTH * 2 / 1e9
        print(f"{r['images']:>9} {r['shards']:>6} {gigabytes:>6.2f} {r['peak_rss_mb']:>11} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>5.2f} {r['peak_uss_mb']:>15} "
              f"{r['peak_uss_mb'] / base['peak_uss_mb']:>5.2f} {r['stats_images_per_second']:>11} "
              f"{r['train']['samples_per_second']:>15} "
              f"{r['train']['samples_per_second'] / base['train']['samples_per_second']:>5.2f} "
              f"{r['train']['worker_setup_seconds']:>13} {r['eval']['accuracy']:>8} {r['load_average']:>5}")
    for r in results:
        print(f"{r['images']}: " + ", ".join(f"{name} {s['seconds']} s (RSS {s['rss_mb']}, private {s['uss_mb']} MB)"
                                              for name, s in r["stages"].items()))


if __name__ == "__main__":
    sys.exit(main())
