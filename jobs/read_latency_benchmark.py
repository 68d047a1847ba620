"""How long one small feature read takes on a small node whose CPUs a training session holds, with Ray's default
idle-worker limit and with init_ray's, in one run:

    python jobs/read_latency_benchmark.py [--reads 5] [--pause 5]

For each setting, a fresh local Ray (2 logical CPUs, both held by actors that stand for the session's training
workers) runs `--reads` tiny Ray Data maps the way FeatureSet.dataset does (num_cpus=0, READ_TASKS tasks), each
importing what a read task imports (cil_platform/feature_cache.py), `--pause` seconds apart (a task's training or
evaluation between two reads). It prints each read's seconds and the ratio of the medians after the first read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_setting(soft_limit: int | None, reads: int, pause: float) -> list[float]:
    """Seconds of each read on a fresh local Ray; soft_limit None: Ray's default."""
    import ray

    from cil_platform.feature_cache import read_options

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={} if soft_limit is None else {"num_workers_soft_limit": soft_limit},
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=1)
    class Holder:  # a training worker holding its CPU for the whole experiment
        def ping(self) -> int:
            return 1

    holders = [Holder.remote() for _ in range(2)]
    ray.get([holder.ping.remote() for holder in holders])

    def read(batch: dict) -> dict:
        import cil_platform.feature_cache  # noqa: F401  (what a read task imports in its worker process)
        return batch

    seconds = []
    for _ in range(reads):
        start = time.perf_counter()
        ray.data.from_items([{"x": i} for i in range(4)], override_num_blocks=2).map_batches(
            read, **read_options(2)).take_all()
        seconds.append(time.perf_counter() - start)
        time.sleep(pause)
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--pause", type=float, default=5.0)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(None if args.one == "default" else int(args.one), args.reads, args.pause)))
        return
    from cil_platform.experiment import IDLE_WORKERS_KEPT

    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    medians = {}
    for setting in ("default", str(IDLE_WORKERS_KEPT)):  # each in its own process: one Ray per process
        done = subprocess.run([sys.executable, __file__, "--one", setting, "--reads", str(args.reads),
                               "--pause", str(args.pause)], capture_output=True, text=True, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        medians[setting] = statistics.median(seconds[1:])
        print(f"soft limit {setting:>7}: reads " + ", ".join(f"{s:.2f}" for s in seconds) + " s")
    default, kept = medians.values()
    print(f"median read after the first: {default:.2f} s -> {kept:.2f} s ({default / kept:.0f}x)")
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
