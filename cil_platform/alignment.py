"""Stage-1 alignment: the starting projection of every CIL run with a given model stack.

The paper starts from MiniGPT-4's already aligned projection. Our analogue trains the projection
on classes disjoint from every evaluation split; the experiment then draws its classes only from
the rest. The result is a safetensors file whose metadata records the classes it saw and the stack
it belongs to; the offline stack's file is shipped in assets/aligned/ (built by jobs/align.py),
any other stack's is built on first use into the cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from gmm_model import ModelStack

from .fsio import atomic_write_bytes

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "aligned"


@dataclass
class AlignedProjection:
    weights: bytes
    classes: list[str]
    origin: str


def alignment_classes(class_names: list[str], count: int, seed: int, reserved: set[str] = frozenset()) -> list[str]:
    """A seeded choice of `count` classes, never one of `reserved` (classes an experiment names)."""
    pool = [c for c in sorted(class_names) if c not in reserved]
    if count > len(pool):
        raise ValueError(f"alignment needs {count} classes but only {len(pool)} are available")
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return sorted(pool[i] for i in order)


def read_aligned(url: str) -> AlignedProjection:
    """An aligned projection file; a truncated or foreign file is refused with a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with fsspec.open(url, "rb") as handle:
        blob = handle.read()
    try:
        load(blob)
        header = json.loads(blob[8: 8 + int.from_bytes(blob[:8], "little")])
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"aligned projection {url} is not a valid safetensors file: {error}") from error
    return AlignedProjection(blob, json.loads(header.get("__metadata__", {}).get("classes", "[]")), url)


def write_aligned(url: str, weights: bytes, classes: list[str], stack: ModelStack, source: str) -> None:
    """Re-serialise the weights with metadata (classes, stack, data source) and write atomically."""
    from safetensors.torch import load, save

    blob = save(load(weights), metadata={"classes": json.dumps(classes), "stack": stack.model_dump_json(),
                                         "source": source})
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write_bytes(fs, path, blob)


def default_aligned_path(stack: ModelStack, cache_dir: str) -> tuple[Path, Path]:
    """(shipped path, cache path) where a stack's aligned projection is looked up."""
    name = f"{stack.fingerprint}.safetensors"
    return SHIPPED_DIR / name, Path(cache_dir) / "aligned" / name
