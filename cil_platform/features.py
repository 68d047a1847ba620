"""Frozen-encoder features, computed once per image with Ray Data and cached on any fsspec URL.

Entries are keyed by (image content hash, encoder identity): the identity names weights, input size
and pooling, so a change to any of them is a cache miss rather than a silent reuse. Each extraction
writes one new shard atomically (temp file + rename locally, a single put on object stores); a
half-written shard is never listed because only `*.safetensors` names are read. A shard's metadata
carries the sha256 of its tensors and its creation stamp: a shard that does not parse, does not match
its sha256, or has none (written before they existed) is skipped with a warning, never trusted; which
value of a key wins is decided by the stamps, not by file names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from gmm_model import create_encoder
from gmm_model.spec import ModelStack

from .config import ExperimentConfig
from .data import LabelledImages, load_dataset
from .storage import open_storage
from .storage.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """Encoder tokens of a set of images: features (N, T, D) float16, labels and content keys."""

    features: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, classes) -> "FeatureTable":
        return self.subset(np.isin(self.labels, list(classes)))

    def subset(self, mask: np.ndarray) -> "FeatureTable":
        """The rows where the boolean `mask` is true."""
        return FeatureTable(self.features[mask], self.labels[mask], self.keys[mask])

    def by_class(self) -> Iterator[tuple[str, np.ndarray]]:
        """(class name, its rows' features as float32), classes in order of first appearance: what every
        class statistic (replay Gaussians, the prior's class means) is computed from."""
        for name in dict.fromkeys(self.labels):
            yield str(name), self.features[self.labels == name].astype(np.float32)


class FeatureCache:
    def __init__(self, url: str, encoder_identity: str, storage_options: dict | None = None):
        storage = open_storage(url, storage_options)
        self.fs, root = storage.fs, storage.path
        digest = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.dir = f"{root.rstrip('/')}/{digest}"
        self.encoder_identity = encoder_identity

    def _shards(self) -> list[str]:
        """Every complete shard's path (order is of no meaning: see load_all)."""
        if not self.fs.exists(self.dir):
            return []
        return sorted(p for p in self.fs.ls(self.dir, detail=False) if p.endswith(".safetensors"))

    def load_all(self) -> dict[str, np.ndarray]:
        """key -> (T, D) features, over every good shard. The oldest entry of a key (by the shards' creation
        stamps) wins: runs that encoded the same image at the same time may differ in the last float16 bit (batch
        composition), and every later reader must see one value, the same for all."""
        shards = [loaded for path in self._shards() if (loaded := self._load_checked(path)) is not None]
        table: dict[str, np.ndarray] = {}
        for _, tensors in sorted(shards, key=lambda shard: shard[0]):
            for key, features in zip(tensors["keys"], tensors["features"]):
                table.setdefault(bytes(key).hex(), features)
        return table

    def _load_checked(self, path: str) -> tuple[tuple[int, str], dict[str, np.ndarray]] | None:
        """((creation stamp, writer), tensors) of a shard whose sha256 matches; None, with a warning, otherwise."""
        try:
            blob = self.fs.cat_file(path)
            meta = _shard_metadata(blob)
            tensors = load_tensors(blob)
            if meta.get("sha256") != _tensors_digest(tensors) or meta.get("encoder") != self.encoder_identity:
                raise ValueError("its sha256 or encoder does not match its content (damaged, or written before "
                                 "shards carried a checksum)")
            return (int(meta["created_ns"]), meta.get("writer", "")), tensors
        except FileNotFoundError:  # removed since the listing
            return None
        except Exception as error:  # safetensors raises its own errors on damaged headers
            log.warning("skipping feature cache shard %s: %s: %s; its images are encoded again", path,
                        type(error).__name__, error)
            return None

    def add(self, keys: list[str], features: np.ndarray) -> None:
        if not keys:
            return
        tensors = {"keys": np.stack([np.frombuffer(bytes.fromhex(k), dtype=np.uint8) for k in keys]),
                   "features": np.ascontiguousarray(features, dtype=np.float16)}
        stamp, writer = time.time_ns(), uuid.uuid4().hex[:8]
        blob = save_tensors(tensors, metadata={"encoder": self.encoder_identity, "sha256": _tensors_digest(tensors),
                                               "created_ns": str(stamp), "writer": writer})
        self.fs.makedirs(self.dir, exist_ok=True)
        atomic_write_bytes(self.fs, f"{self.dir}/{stamp:020d}-{writer}.safetensors", blob)


def _tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _shard_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header: 8 bytes of length, then JSON)."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    return header.get("__metadata__") or {}


class EncodeBatch:
    """Ray Data actor: runs the frozen encoder on rows whose features are not cached yet."""

    def __init__(self, stack: ModelStack, cached: frozenset[str], threads: int = 1):
        torch.set_num_threads(threads)
        self.stack, self.cached, self._encoder = stack, cached, None

    @property
    def encoder(self):
        """Loaded on the first cache miss: a fully cached pass never pays for the network."""
        if self._encoder is None:
            self._encoder = create_encoder(self.stack).eval()
        return self._encoder

    def __call__(self, batch: dict) -> dict:
        todo = [i for i, (k, e) in enumerate(zip(batch["key"], batch["error"])) if not e and k not in self.cached]
        features = np.zeros((len(batch["key"]), 0, 0), dtype=np.float16)
        if todo:
            encoded = self.encoder.encode([np.asarray(batch["image"][i]) for i in todo]).numpy()
            features = np.zeros((len(batch["key"]), *encoded.shape[1:]), dtype=np.float16)
            features[todo] = encoded
        computed = np.zeros(len(batch["key"]), dtype=bool)
        computed[todo] = True
        return {"key": batch["key"], "label": batch["label"], "error": batch["error"], "part": batch["part"],
                "computed": computed, "features": features}


def extract_features(parts: list[LabelledImages], stack: ModelStack, cache: FeatureCache,
                     actors: int = 2, batch_size: int = 64) -> list[FeatureTable]:
    """Features of every decodable image of each part (e.g. train and test), in one Ray Data pass.

    Rows with an error are dropped and counted by reason. One pass means one pool of encoder
    actors (each a process that loads torch and the encoder) rather than one per part.
    """
    stored = cache.load_all()
    tagged = [p.dataset.add_column("part", lambda batch, i=i: np.full(len(batch["key"]), i), batch_format="numpy")
              for i, p in enumerate(parts)]
    encoded = (tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]).map_batches(
        EncodeBatch, fn_constructor_kwargs={"stack": stack, "cached": frozenset(stored)},
        # each actor runs one torch thread; reserving half a CPU leaves room for the reading and
        # decoding tasks upstream, which would otherwise wait forever for a CPU on a small node
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.5, batch_size=batch_size, batch_format="numpy")
    collected = [{"keys": [], "labels": [], "skipped": Counter()} for _ in parts]
    new_keys, new_features = [], []
    for batch in encoded.iter_batches(batch_size=1024, batch_format="numpy"):
        for i, (key, label, error, part) in enumerate(zip(batch["key"], batch["label"], batch["error"], batch["part"])):
            into = collected[int(part)]
            if error:
                into["skipped"][str(error).split(":")[0]] += 1
                continue
            into["keys"].append(str(key))
            into["labels"].append(str(label))
            if batch["computed"][i]:
                new_keys.append(str(key))
                new_features.append(batch["features"][i])
    if new_keys:
        cache.add(new_keys, np.stack(new_features))
        stored = cache.load_all()  # not our own values: another run may have stored some of these keys first
    tables = []
    for part in collected:
        if part["skipped"]:
            log.warning("skipped %d unreadable images: %s", sum(part["skipped"].values()), dict(part["skipped"]))
        keys = part["keys"]
        features = np.stack([stored[k] for k in keys]) if keys else np.zeros((0, 0, 0), np.float16)
        tables.append(FeatureTable(features, np.asarray(part["labels"], dtype=object), np.asarray(keys, dtype=object),
                                   part["skipped"]))
    log.info("features: %d images, %d computed, %d from cache", sum(map(len, tables)), len(new_keys),
             sum(map(len, tables)) - len(new_keys))
    return tables


def features_for(cfg: ExperimentConfig, encoder_identity: str, classes: list[str],
                 **dataset_overrides) -> tuple[FeatureTable, FeatureTable]:
    """Cached frozen features of the train and test split of `classes` (computed where missing)."""
    splits = load_dataset(cfg.dataset.model_copy(update=dataset_overrides), classes=classes)
    cache = FeatureCache(cfg.features_url, encoder_identity, cfg.storage.options)
    train, test = extract_features([splits.train, splits.test], cfg.stack, cache, actors=cfg.dataset.encoder_actors)
    require_training_images(train, classes)
    return train, test


def require_training_images(train: FeatureTable, classes: list[str]) -> None:
    """A class without one decodable training image cannot be learned: fail here, naming it, before any task
    trains or publishes, instead of when its task comes (or never, with a projection that silently lacks it)."""
    missing = sorted(set(classes) - set(train.labels))
    if missing:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(train.skipped.items())) or "none"
        raise ValueError(f"{len(missing)} classes have no training images that decode: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} (undecodable training images skipped: {skipped}); "
                         "add readable images for them or leave them out (scenario.class_order / num_classes)")
