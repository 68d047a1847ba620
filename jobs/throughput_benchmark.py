"""Per-sample training efficiency of GMM on this machine, in one run: how close `GMM.loss` + backward + AdamW gets
to the machine's own fp32 matmul peak.

    python jobs/throughput_benchmark.py                 # demo stack, batch 16, the machine's cores as threads
    python jobs/throughput_benchmark.py --threads 1 --batch 8 --steps 20

Prints: the fp32 matmul peak (a 2048^3 matmul, best of several); the analytic FLOPs of one training sample (how
they are counted is printed with them); samples/s of a plain single-process loop over the real model (forward only,
and forward + backward + AdamW on the projection); and the fraction of the peak each achieves. Then the platform:
one training session (training/session.py, the train config's workers) runs `--tasks` updates of the demo's size
one after another, and the benchmark prints the session's start-up, each update's steady-state samples/s (its
optimizer steps alone), its fixed overhead (driver wall minus the steps: posting, checkpoints, returning the
weights) as a share of its steps, and the effective samples/s (trained samples / the whole wall time). The model is the
stack's real frozen LLM with a fresh projection; inputs are random visual tokens of the encoder's shape with real
class names of the demo's length, so the cost is the real one (nothing here depends on the weights' values).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from cil_platform.config import load_config  # noqa: E402
from cil_platform.data import dataset_class_names  # noqa: E402
from cil_platform.experiment import init_ray  # noqa: E402
from cil_platform.features import FeatureTable  # noqa: E402
from cil_platform.training.session import SessionSpec, TrainingSession  # noqa: E402
from gmm_model import create_encoder, create_gmm  # noqa: E402


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of one size^3 matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sample_flops(gmm, visual_tokens: int, visual_width: int, names: list[str]) -> tuple[float, str]:
    """FLOPs of forward + backward for one training sample, counted from the model's shapes.

    Per token the decoder runs after the cached prefix (image tokens, suffix, the answer less its last token, which
    predicts nothing and is not fed): 2 x the frozen decoder's matmul parameters
    forward, and as much again backward (the input gradients; the frozen weights get no gradients), plus attention
    scores and values over the context (2 x 2 x context x width per layer, forward and backward alike). The LM head
    on the answer positions: 2 x width x vocab per answer token, forward and backward. The projection: 2 x Dv x H per
    visual token forward, twice that backward (input and weight gradients)."""
    cfg = gmm.llm.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * (d * d + 2 * d * kv + d * d) + 2 * 3 * d * cfg.intermediate_size  # q, k, v, o + gated MLP
    answer = sum(len(gmm.tokens.answer(n)) for n in names) / len(names)
    prefix, suffix = len(gmm.tokens.prefix), len(gmm.tokens.suffix)
    tokens = visual_tokens + suffix + answer - 1
    context = prefix + tokens / 2  # the mean context a token attends over
    decoder = tokens * layers * (per_layer + 2 * 2 * context * d)
    head = answer * 2 * d * vocab
    projection = visual_tokens * 2 * visual_width * d
    total = 2 * decoder + 2 * head + 3 * projection
    how = (f"{tokens:.1f} tokens per sample after a {prefix}-token cached prefix ({visual_tokens} visual, {suffix} "
           f"suffix, {answer - 1:.1f} answer tokens fed, {answer:.1f} predicted), {layers} layers of width {d}; "
           f"decoder {2 * decoder / 1e9:.3f}, LM head {2 * head / 1e9:.3f}, projection {3 * projection / 1e9:.4f} "
           "GFLOP (forward + backward)")
    return total, how


def loop_rate(gmm, visual: torch.Tensor, names: list[str], steps: int, train: bool) -> float:
    """Samples/s of a plain loop: forward (and backward + AdamW on the projection when `train`)."""
    optimizer = torch.optim.AdamW(gmm.projection.parameters(), lr=1e-3)

    def step():
        if train:
            loss = gmm.loss(visual, names)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                gmm.loss(visual, names)

    step()  # warm-up: the prefix cache, allocator
    seconds = _timed(lambda: [step() for _ in range(steps)])
    return steps * len(names) / seconds


def platform_rates(cfg, visual_width: int, tokens: int, classes: list[str], tasks: int, per_task: int) -> dict:
    """A session of `tasks` updates of `per_task` new images each (random tokens, real names), with pseudo replay
    at the config's ratio: start-up, per-update steps and overhead, and the effective rate over the whole wall."""
    import tempfile

    import numpy as np

    init_ray(cfg.ray_address)
    rng = np.random.default_rng(0)
    replay = {"mode": "pseudo", "classes": classes[:10], "mean": rng.standard_normal((10, tokens, visual_width),
              dtype=np.float32), "std": np.ones((10, tokens, visual_width), np.float32)}
    started = time.perf_counter()
    updates = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as storage:
        spec = SessionSpec(name="throughput", stack=cfg.stack, visual_width=visual_width, cache_dir=cfg.cache_dir,
                           train=cfg.train, storage_url=storage)
        with TrainingSession(spec) as session:
            start = None
            for task in range(tasks):
                names = [classes[10 + (task * 10 + i % 10)] for i in range(per_task)]
                rows = FeatureTable(rng.standard_normal((per_task, tokens, visual_width)).astype(np.float16),
                                    np.asarray(names, dtype=object), np.asarray([f"{i:040x}" for i in range(per_task)]))
                result = session.fit(f"task-{task:03d}", rows, start, seed=task, replay=replay,
                                     replay_ratio=cfg.replay.ratio)
                start = result.projection
                updates.append(result)
        wall = time.perf_counter() - started
    ray.shutdown()
    return {"wall": wall, "updates": updates, "startup": updates[0].seconds - updates[0].metrics["steps_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=16, help="samples per step (the demo: 8 new + 8 replayed)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=4, help="updates in the platform's session (0: skip it)")
    parser.add_argument("--per-task", type=int, default=160, help="new images per update (the demo: 10 x 16)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    peak = matmul_peak(args.threads)
    encoder = create_encoder(cfg.stack)
    gmm = create_gmm(cfg.stack, encoder.width, cfg.cache_dir)
    torch.set_num_threads(args.threads)
    classes = dataset_class_names(cfg.dataset)
    ray.shutdown()  # the listing started a local Ray: its processes must not share the cores being measured
    names = [classes[i % len(classes)] for i in range(0, args.batch * 7, 7)]
    visual = torch.randn(args.batch, encoder.num_tokens, encoder.width)
    flops, how = sample_flops(gmm, encoder.num_tokens, encoder.width, names)
    forward = loop_rate(gmm, visual, names, args.steps, train=False)
    train = loop_rate(gmm, visual, names, args.steps, train=True)
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} steps; load average {os.getloadavg()[0]:.2f}")
    print(f"fp32 matmul peak (2048^3):            {peak / 1e9:8.1f} GFLOP/s")
    print(f"FLOPs per training sample (analytic): {flops / 1e9:8.3f} GFLOP  ({how})")
    print(f"plain loop, forward only:             {forward:8.1f} samples/s")
    print(f"plain loop, forward+backward+AdamW:   {train:8.1f} samples/s = {train * flops / 1e9:.1f} GFLOP/s "
          f"= {train * flops / peak:.0%} of the matmul peak")
    if args.tasks:
        platform = platform_rates(cfg, encoder.width, encoder.num_tokens, classes, args.tasks, args.per_task)
        report_platform(platform, flops, peak, cfg.train.num_workers)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def report_platform(platform: dict, flops: float, peak: float, workers: int) -> None:
    updates = platform["updates"]
    print(f"platform: one session, {workers} workers, {len(updates)} updates; start-up (worker group, LLM load, "
          f"the first update's own overhead) {platform['startup']:.1f} s, once")
    for i, update in enumerate(updates):
        steps = update.metrics["steps_seconds"]
        overhead = update.seconds - steps - (platform["startup"] if i == 0 else 0.0)
        rate = update.images / steps if steps else float("nan")  # all workers' samples over all epochs' steps
        print(f"  update {i}: {update.images} samples, steps {steps:.1f} s = {rate:.1f} samples/s "
              f"({rate * flops / peak:.0%} of the peak), overhead {overhead:.1f} s = {overhead / steps:.1%} of the steps")
    trained = sum(u.images for u in updates)
    print(f"  effective: {trained} samples in {platform['wall']:.1f} s wall = {trained / platform['wall']:.1f} samples/s")



if __name__ == "__main__":
    sys.exit(main())
