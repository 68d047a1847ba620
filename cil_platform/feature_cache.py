"""The feature cache's shards on any fsspec URL: written, verified, indexed and read (cil_platform/features.py says
what the cache is for and how it is streamed).

Its own module with light imports (numpy, safetensors, fsspec, Ray; no torch, no transformers): the Ray Data tasks
that index and read shards import it in fresh worker processes, where importing the model stack cost 10-20 s per
read on this machine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass

import numpy as np
import ray
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from .storage import open_storage
from .storage.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

READ_TASKS = 2  # concurrent Ray Data read tasks per stream; they ask for no CPU (see read_options)


def read_options(inputs: int) -> dict:
    """Ray Data map options of every feature read over `inputs` blocks: num_cpus=0, because a training session's
    workers hold every CPU of a small node for the whole experiment and a read that waited for a CPU would wait
    forever; the pool size caps the concurrent reads instead."""
    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=max(1, min(READ_TASKS, inputs)))}


def preserve_order() -> None:
    """Streams come out in the order of their inputs (a dataset captures the current DataContext when it is made):
    a consumer's rows are a function of the set, not of Ray's scheduling."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True


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
        """key -> (T, D) features, over every good shard, read in this process (a small cache: tools, tests). The
        oldest entry of a key (by the shards' creation stamps) wins: runs that encoded the same image at the same
        time may differ in the last float16 bit (batch composition), and every later reader must see one value."""
        shards = {path: loaded for path in self._shards() if (loaded := self._load_checked(path)) is not None}
        index = CacheIndex.of([(path, stamp, tensors["keys"], tensors["features"].shape[1:])
                               for path, (stamp, tensors) in shards.items()])
        return {key.tobytes().hex(): shards[index.shards[s]][1]["features"][r]
                for key, s, r in zip(index.keys, index.shard, index.row)}

    def index(self) -> "CacheIndex":
        """Where each key's winning value lives, over every good shard: a Ray Data pass that reads and verifies every
        shard in parallel and hands the driver only each shard's keys and stamp (the features stay where they are)."""
        paths = self._shards()
        if not paths:
            return CacheIndex.of([])
        preserve_order()
        blocks = min(len(paths), 200)
        listed = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks).map_batches(
            _index_shards, fn_kwargs={"cache": self}, batch_size=8, **read_options(blocks))
        found = []
        for batch in listed.iter_batches(batch_size=None, batch_format="numpy"):
            for path, stamp, writer, width, keys, shape in zip(batch["path"], batch["stamp"], batch["writer"],
                                                               batch["width"], batch["keys"], batch["shape"]):
                if width >= 0:  # -1: skipped (damaged), with the reader's warning in its log
                    found.append((str(path), (int(stamp), str(writer)),
                                  np.frombuffer(keys, np.uint8).reshape(-1, max(int(width), 1)),
                                  tuple(json.loads(shape))))
        return CacheIndex.of(found)

    def read(self, path: str) -> dict[str, np.ndarray]:
        """A shard's tensors, verified; a shard damaged since it was indexed is an error naming it."""
        loaded = self._load_checked(path)
        if loaded is None:
            raise ValueError(f"feature cache shard {path} is gone or damaged since it was indexed; run again to "
                             "re-encode its images")
        return loaded[1]

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


def _index_shards(batch: dict, cache: FeatureCache) -> dict:
    """Ray Data map: each shard's stamp, writer, token shape and keys (bytes); width -1 for a shard that failed its
    check (skipped, with the reader's warning)."""
    out = {"path": [], "stamp": [], "writer": [], "width": [], "keys": [], "shape": []}
    for path in batch["path"]:
        loaded = cache._load_checked(str(path))
        (stamp, writer), tensors = loaded if loaded else ((0, ""), None)
        keys = tensors["keys"] if tensors else np.zeros((0, 0), np.uint8)
        out["path"].append(str(path))
        out["stamp"].append(stamp)
        out["writer"].append(writer)
        out["width"].append(keys.shape[1] if tensors else -1)
        out["keys"].append(np.ascontiguousarray(keys).tobytes())
        out["shape"].append(json.dumps(list(tensors["features"].shape[1:])) if tensors else "[]")
    return {"path": np.asarray(out["path"]), "stamp": np.asarray(out["stamp"], np.int64),
            "writer": np.asarray(out["writer"]), "width": np.asarray(out["width"], np.int64),
            "keys": np.asarray(out["keys"], dtype=object), "shape": np.asarray(out["shape"])}


@dataclass
class CacheIndex:
    """Where the winning (oldest) value of every cached key lives: per key, sorted by its bytes, the shard and row."""

    shards: list[str]
    keys: np.ndarray  # (K, L) uint8, rows sorted by their bytes
    shard: np.ndarray  # (K,) int32: index into `shards`
    row: np.ndarray  # (K,) int32: row within that shard
    token_shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, found: list[tuple[str, tuple[int, str], np.ndarray, tuple[int, ...]]]) -> "CacheIndex":
        """From (path, (stamp, writer), keys (n, L) uint8, token shape) of every good shard; a key in several shards
        resolves to the oldest one (by stamp, then writer)."""
        found = sorted(found, key=lambda shard: shard[1])
        if not found:
            return cls([], np.zeros((0, 0), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.int32))
        widths, shapes = {f[2].shape[1] for f in found if len(f[2])}, {tuple(f[3]) for f in found if len(f[2])}
        if len(widths) > 1 or len(shapes) > 1:
            raise ValueError(f"feature cache shards disagree on key width {widths} or token shape {shapes}")
        width = widths.pop() if widths else 0
        keys = np.concatenate([f[2].reshape(-1, width) for f in found]).astype(np.uint8)
        shard = np.concatenate([np.full(len(f[2]), i, np.int32) for i, f in enumerate(found)])
        row = np.concatenate([np.arange(len(f[2]), dtype=np.int32) for f in found])
        _, first = np.unique(keys_as_bytes(keys), return_index=True)  # first occurrence in oldest-first order
        return cls([f[0] for f in found], keys[first], shard[first], row[first], shapes.pop() if shapes else ())

    def __len__(self) -> int:
        return len(self.keys)

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Index into this index of each key ((n, L) uint8); -1 where a key is not cached."""
        if not len(self) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        mine, wanted = keys_as_bytes(self.keys), keys_as_bytes(keys)
        at = np.minimum(np.searchsorted(mine, wanted), len(mine) - 1)
        return np.where(mine[at] == wanted, at, -1)


def keys_as_bytes(keys: np.ndarray) -> np.ndarray:
    """(n, L) uint8 -> (n,) fixed-width byte strings, which numpy sorts and compares as whole keys."""
    keys = np.ascontiguousarray(keys, dtype=np.uint8)
    return keys.view(f"S{keys.shape[1]}").reshape(len(keys)) if keys.size else np.zeros(len(keys), "S1")


def key_bytes(keys) -> np.ndarray:
    """Hex content keys -> (n, L) uint8."""
    keys = [bytes.fromhex(str(k)) for k in keys]
    return np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1) if keys else np.zeros((0, 0), np.uint8)


def read_rows(batch: dict, cache: FeatureCache, where: list, classes: list[str]) -> dict:
    """Ray Data map: one shard's rows of a FeatureSet.dataset, read and verified here."""
    meta, names = ray.get(where[0]), np.asarray(classes)
    out = {"position": [], "label": [], "features": []}
    for path, start, stop in zip(batch["path"], batch["start"], batch["stop"]):
        features = cache.read(str(path))["features"]
        out["position"].append(meta["position"][start:stop])
        out["label"].append(names[meta["code"][start:stop]])
        out["features"].append(features[meta["row"][start:stop]])
    return {name: np.concatenate(parts) for name, parts in out.items()}


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
