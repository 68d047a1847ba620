"""Stage-1 alignment: the starting projection of every CIL run with a given model stack.

The paper starts from MiniGPT-4's already aligned projection. Our analogue trains the projection
on classes disjoint from every evaluation split: classes of the experiment's own dataset (the
experiment then draws its classes only from the rest), or a separate corpus of named images
(`alignment.dataset`, e.g. scripts/build_alignment_corpus.py's clip-art) whose names the experiment's
dataset never uses. The result is a safetensors file whose metadata records the classes it saw and the stack
it belongs to; the offline stack's file is shipped in assets/aligned/ (built by jobs/align.py),
any other stack's is built on first use into the cache.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load, save

from gmm_model.spec import ModelStack

from .config import ExperimentConfig
from .data import dataset_class_names
from .features import feature_sets_for
from .paths import ASSETS_DIR
from .storage.atomic import atomic_write_bytes
from .training.fit import FitSpec, fit_projection

log = logging.getLogger(__name__)

SHIPPED_DIR = ASSETS_DIR / "aligned"


@dataclass
class AlignedProjection:
    weights: bytes
    classes: list[str]
    origin: str


def alignment_classes(class_names: list[str], count: int | None, seed: int,
                      reserved: set[str] = frozenset()) -> list[str]:
    """A seeded choice of `count` classes (None: all), never one of `reserved` (classes an experiment names)."""
    pool = [c for c in sorted(class_names) if c not in reserved]
    if count is None:
        return pool
    if count > len(pool):
        raise ValueError(f"alignment needs {count} classes but only {len(pool)} are available")
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return sorted(pool[i] for i in order)


def read_aligned(url: str) -> AlignedProjection:
    """An aligned projection file; a truncated or foreign file is refused with a clear error."""
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
    blob = save(load(weights), metadata={"classes": json.dumps(classes), "stack": stack.model_dump_json(),
                                         "source": source})
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write_bytes(fs, path, blob)


def provenance(cfg: ExperimentConfig, aligned: AlignedProjection) -> dict:
    """What a shipped projection was aligned on, for the JSON beside it: the dataset, the class count and, for
    a corpus from scripts/build_alignment_corpus.py, its packages and their licences (its corpus.json)."""
    dataset = cfg.alignment.dataset or cfg.dataset
    record = {"dataset": dataset.model_dump(mode="json", exclude={"storage_options"}),
              "classes": len(aligned.classes)}
    if dataset.path:
        manifest = f"{dataset.path.rstrip('/')}/corpus.json"
        fs, path = fsspec.core.url_to_fs(manifest, **dataset.storage_options)
        if fs.isfile(path):
            corpus = json.loads(fs.cat_file(path))
            record["corpora"] = corpus.get("sources", [])
            record["corpus"] = {k: corpus.get(k) for k in ("name", "built_by", "images", "classes", "max_per_class")}
    return record


def sidecar_path(url: str) -> str:
    """The provenance JSON beside an aligned projection: x.safetensors -> x.json."""
    return url.removesuffix(".safetensors") + ".json"


def write_sidecar(url: str, cfg: ExperimentConfig, aligned: AlignedProjection, **extra) -> str:
    """Write provenance(cfg, aligned) plus `extra` beside the projection at `url`; returns the JSON's URL."""
    record = json.dumps({**provenance(cfg, aligned), "stack": cfg.stack.fingerprint, **extra}, indent=1) + "\n"
    fs, path = fsspec.core.url_to_fs(sidecar_path(url))
    atomic_write_bytes(fs, path, record.encode())
    return sidecar_path(url)


def default_aligned_path(stack: ModelStack, cache_dir: str) -> tuple[Path, Path]:
    """(shipped path, cache path) where a stack's aligned projection is looked up."""
    name = f"{stack.fingerprint}.safetensors"
    return SHIPPED_DIR / name, Path(cache_dir) / "aligned" / name


def resolve_alignment(cfg: ExperimentConfig, class_names: list[str], visual_width: int,
                      encoder_identity: str) -> AlignedProjection | None:
    """The configured, shipped or cached aligned projection; built (one Ray Train fit) when absent."""
    if not cfg.alignment.enabled:
        return None
    if cfg.alignment.projection:
        return read_aligned(cfg.alignment.projection)
    shipped, cached = default_aligned_path(cfg.stack, cfg.cache_dir)
    for path in (shipped, cached):
        if path.is_file():
            return read_aligned(str(path))
    log.warning("no aligned projection for stack %s; building it (stage 1)", cfg.stack.fingerprint)
    aligned = align_projection(cfg, class_names, visual_width, encoder_identity)
    write_aligned(str(cached), aligned.weights, aligned.classes, cfg.stack, "built on first use")
    return read_aligned(str(cached))


def alignment_source(cfg: ExperimentConfig, class_names: list[str]) -> tuple[ExperimentConfig, list[str], set[str]]:
    """(config whose dataset alignment reads, that dataset's class names, the classes it must not use).

    By default alignment takes classes of the experiment's own dataset, outside the scenario's. With
    `alignment.dataset` it reads that corpus instead, and every name of the experiment's dataset is reserved.
    """
    reserved = set(cfg.scenario.class_order or [])
    corpus = cfg.alignment.dataset
    if corpus is None:
        return cfg, class_names, reserved
    return cfg.model_copy(update={"dataset": corpus}), dataset_class_names(corpus), reserved | set(class_names)


def align_projection(cfg: ExperimentConfig, class_names: list[str], visual_width: int,
                     encoder_identity: str) -> AlignedProjection:
    """Stage 1: train a fresh projection on `alignment.num_classes` seeded classes outside the scenario's
    (`class_names`: the experiment dataset's)."""
    align = cfg.alignment
    source, pool, reserved = alignment_source(cfg, class_names)
    classes = alignment_classes(pool, align.num_classes, align.class_seed, reserved=reserved)
    train, _ = feature_sets_for(source, encoder_identity, classes, train_per_class=align.train_per_class,
                                test_per_class=1)
    result = fit_projection(FitSpec(
        name="alignment", features=train, start=None, stack=cfg.stack, visual_width=visual_width,
        cache_dir=cfg.cache_dir, train=cfg.train.model_copy(update={"epochs": align.epochs, "lr": align.lr}),
        storage_url=cfg.train_storage_url, seed=cfg.seed, storage_options=cfg.storage.options))
    return AlignedProjection(result.projection, classes, "stage-1")
