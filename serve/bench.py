"""Closed-loop load benchmark of /v1/classify across a version swap (not a test).

Each client thread sends its next request as soon as the previous one is answered, for a fixed time.
Half-way through (`--swap-at`), the benchmark announces another version and reports requests/s and
p50/p95/p99 latency for the requests started before the announcement, while it was being applied, and
after it settled, with the error count and the versions that answered.

    # self-contained: a local Ray instance, a temporary store with versions 0 and 1, the app from serve/config.yaml
    python -m serve.bench --launch --duration 60 --swap-at 20 --clients 4
    # against a running app (loopback only); announces an existing store version
    python -m serve.bench --url http://127.0.0.1:8000 --swap-version 3   # tokens from $GMM_CIL_SERVE_TOKEN and
                                                                         # $GMM_CIL_SERVE_ADMIN_TOKEN (the announce)

Only loopback addresses are accepted as targets.
"""
from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script: make the repository importable, not serve/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx
import numpy as np

from cil_platform.paths import ASSETS_DIR, DATA_DIR


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"refusing to load {url!r}: the benchmark only targets loopback addresses")
    return url.rstrip("/")


def drawings(count: int) -> list[bytes]:
    """QuickDraw test drawings (index 90 of the first classes) as 28x28 RGB PNGs, ink dark on white."""
    from PIL import Image

    images = np.load(DATA_DIR / "quickdraw345.npz")["images"]
    out = []
    for c in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.repeat((255 - images[c, 90])[..., None], 3, axis=-1)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@dataclass
class Record:
    start: float
    end: float
    status: int
    version: int | None


@dataclass
class Phase:
    name: str
    start: float
    end: float
    records: list[Record] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = np.array([r.end - r.start for r in self.records if r.status == 200]) * 1000
        span = max(self.end - self.start, 1e-9)
        pct = (lambda q: round(float(np.percentile(latencies, q)), 1)) if len(latencies) else (lambda q: None)
        versions: dict[str, int] = {}
        for r in self.records:
            if r.version is not None:
                versions[str(r.version)] = versions.get(str(r.version), 0) + 1
        return {"phase": self.name, "seconds": round(span, 2), "requests": len(self.records),
                "rps": round(len(self.records) / span, 2), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "errors": sum(r.status != 200 for r in self.records), "versions": versions}


def run_load(url: str, token: str | None, clients: int, duration_s: float, swap_at_s: float,
             swap) -> tuple[list[Phase], dict]:
    images = drawings(8)
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {token}"} if token else {})}
    records: list[Record] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = index
            while not stop.is_set():
                body = images[n % len(images)]
                n += clients
                started = time.monotonic()
                try:
                    response = http.post(f"{url}/v1/classify", content=body, headers=headers)
                    status = response.status_code
                    version = response.json().get("version") if status == 200 else None
                except Exception:
                    status, version = -1, None
                with lock:
                    records.append(Record(started, time.monotonic(), status, version))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(swap_at_s)
    swap_start = time.monotonic()
    try:
        swap_result = swap()
    except Exception as error:  # report the load figures all the same
        swap_result = {"version": None, "previous": None, "settled": False, "error": repr(error)}
    swap_end = time.monotonic()
    time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
    stop.set()
    end = time.monotonic()
    for thread in threads:
        thread.join(timeout=120)
    phases = [Phase("before swap", t0, swap_start), Phase("during swap", swap_start, swap_end),
              Phase("after swap", swap_end, end)]
    for record in records:  # a request belongs to the phase it was sent in
        next(p for p in reversed(phases) if record.start >= p.start or p is phases[0]).records.append(record)
    return phases, {**swap_result, "swap_seconds": round(swap_end - swap_start, 2)}


def launch(store_dir: str, port: int) -> str:
    """A local Ray instance with the app from serve/config.yaml on a store holding versions 0 and 1."""
    import ray
    import torch

    from cil_platform.storage.store import ProjectionStore
    from gmm_model import ModelStack, Projection
    from serve.deploy import start

    stack = ModelStack()
    aligned = ASSETS_DIR / "aligned" / f"{stack.fingerprint}.safetensors"
    names = [str(n) for n in np.load(DATA_DIR / "quickdraw345.npz")["class_names"]]
    store = ProjectionStore(store_dir)
    for version in (0, 1):
        if aligned.is_file():
            weights = aligned.read_bytes()
        else:
            torch.manual_seed(version)
            weights = Projection(1280, 576).to_bytes()
        # the `trie` rule (no class statistics): the decoding whose cost the recorded run in docs/serving.md measured
        store.publish(version, weights, names[: 10 * (version + 1)], stack.fingerprint, rule="trie")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # start pinned on version 0 and poll rarely: the swap under measurement is the announced one, to version 1
    return start(store_dir, port=port, deployments={"Captioner": {"user_config": {"version": 0}},
                                                    "Matcher": {"user_config": {"version": 0}},
                                                    "Watcher": {"user_config": {"poll_interval_s": 3600}}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running app (loopback only)")
    target.add_argument("--launch", action="store_true", help="start a local app on a temporary store")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port of a launched app")
    parser.add_argument("--token", default=os.environ.get("GMM_CIL_SERVE_TOKEN"), help="the API token")
    parser.add_argument("--admin-token", default=os.environ.get("GMM_CIL_SERVE_ADMIN_TOKEN"),
                        help="the admin token, for the announcement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in all")
    parser.add_argument("--swap-at", type=float, default=20.0, help="seconds into the load to announce")
    parser.add_argument("--swap-version", type=int, default=None, help="version to announce (default: latest)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    from serve.client import announce

    scratch = None
    if args.launch:
        scratch = tempfile.TemporaryDirectory(prefix="gmm-cil-bench-")
        url = launch(f"{scratch.name}/store", args.port)
        swap_version = 1 if args.swap_version is None else args.swap_version
    else:
        url, swap_version = loopback_only(args.url), args.swap_version
    try:
        # warm-up: first requests pay for lazy initialisation
        for _ in range(3):
            httpx.post(f"{url}/v1/classify", content=drawings(1)[0], timeout=120,
                       headers={"Content-Type": "image/png",
                                **({"Authorization": f"Bearer {args.token}"} if args.token else {})})
        phases, swap = run_load(url, args.token, args.clients, args.duration, args.swap_at,
                                lambda: announce(url, swap_version, args.admin_token))
    finally:
        if args.launch:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            scratch.cleanup()
    rows = [p.summary() for p in phases]
    print(f"\n{args.clients} closed-loop clients, {args.duration:.0f}s, swap to version {swap['version']} "
          f"(from {swap['previous']}) announced at {args.swap_at:.0f}s, settled={swap['settled']} "
          f"in {swap['swap_seconds']}s{'  ERROR: ' + swap['error'] if 'error' in swap else ''}\n")
    print(f"{'phase':<13} {'s':>6} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6}  versions")
    for r in rows:
        print(f"{r['phase']:<13} {r['seconds']:>6} {r['requests']:>8} {r['rps']:>7} {str(r['p50_ms']):>8} "
              f"{str(r['p95_ms']):>8} {str(r['p99_ms']):>8} {r['errors']:>6}  {r['versions']}")
    total_errors = sum(r["errors"] for r in rows)
    print(f"\nerrors in all: {total_errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": rows, "swap": swap, "clients": args.clients,
                                               "duration_s": args.duration}, indent=2))


if __name__ == "__main__":
    main()
