"""Frozen-encoder features, computed once per image with Ray Data and cached on any fsspec URL; read back by Ray Data.

Entries are keyed by (image content hash, encoder identity): the identity names weights, input size
and pooling, so a change to any of them is a cache miss rather than a silent reuse. Each extraction batch
writes one new shard atomically from the encoder actor that computed it (temp file + rename locally, a single
put on object stores); a half-written shard is never listed because only `*.safetensors` names are read. A
shard's metadata carries the sha256 of its tensors and its creation stamp: a shard that does not parse, does not
match its sha256, or has none (written before they existed) is skipped with a warning, never trusted; which
value of a key wins is decided by the stamps, not by file names.

The driver never holds the features (docs/data_plane.md): a `FeatureSet` is, per image, its label (a class code),
content key and place in the cache (shard, row), about 30 bytes; its features are read by Ray Data tasks, every
shard verified on every read, into the process that consumes them (a training or evaluation worker through
`dataset`, a class statistic or a baseline through `batches`). `FeatureTable` is the in-memory form: one batch of
a stream, or a small set built in memory (tests, synthetic benchmarks); both have the same interface.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import ray
import torch
import torch.nn.functional as F

from gmm_model import create_encoder
from gmm_model.spec import ModelStack

from .config import ExperimentConfig
from .data import LabelledImages, load_dataset
from .feature_cache import (CacheIndex, FeatureCache, key_bytes, keys_as_bytes, preserve_order, read_options,
                            read_rows)

log = logging.getLogger(__name__)


def pooled_unit(features: np.ndarray) -> torch.Tensor:
    """(N, T, D) tokens -> (N, D) unit-norm mean-pooled vectors (the encoder's global embedding)."""
    return F.normalize(torch.from_numpy(features.astype(np.float32)).mean(1), dim=1)


def pool_rows(rows: "FeatureSet | FeatureTable", batch_size: int = 1024) -> torch.Tensor:
    """pooled_unit of every row, in row order, computed batch by batch: (N, D) float32, half the bytes of the
    features themselves for 4 float16 tokens."""
    out = torch.zeros(0, 0)
    for batch in rows.batches(batch_size):
        pooled = pooled_unit(batch.features)
        if not out.numel():
            out = torch.zeros(len(rows), pooled.shape[1])
        out[torch.tensor(batch.positions)] = pooled
    return out


class Pooled:
    """A set of rows whose pooled unit vectors are read once: every baseline, the NCM and the ridge fusion classify
    on them, so a task's rows (and its seen classes' test rows) pass through Ray Data once for all of them."""

    @cached_property
    def pooled(self) -> torch.Tensor:
        """pool_rows of this set, computed on first use and kept with it (N x D float32); read-only."""
        return pool_rows(self)


@dataclass
class FeatureTable(Pooled):
    """Encoder tokens of a set of images held in memory: features (N, T, D) float16, labels and content keys."""

    features: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    positions: np.ndarray | None = None  # a batch's rows' positions in the set it was streamed from

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, classes) -> "FeatureTable":
        return self.subset(np.isin(self.labels, list(classes)))

    def subset(self, mask: np.ndarray) -> "FeatureTable":
        """The rows where the boolean `mask` is true."""
        return FeatureTable(self.features[mask], self.labels[mask], self.keys[mask])

    def batches(self, size: int = 1024) -> Iterator["FeatureTable"]:
        """Every row, `size` at a time, each batch with its rows' `positions` (what a streamed set yields; here,
        slices in order)."""
        for start in range(0, len(self), size):
            batch = self.subset(slice(start, start + size))
            batch.positions = np.arange(start, start + len(batch))
            yield batch

    def by_class(self) -> Iterator[tuple[str, np.ndarray]]:
        """(class name, its rows' features as float32), classes in order of first appearance."""
        for name in dict.fromkeys(self.labels):
            yield str(name), self.features[self.labels == name].astype(np.float32)

    def dataset(self, positions: np.ndarray) -> ray.data.Dataset:
        """The rows at `positions` as a Ray Dataset of {position, label, features} (read_positions reads it back)."""
        positions = np.asarray(positions, dtype=np.int64)
        return ray.data.from_blocks([ray.data.block.BlockAccessor.batch_to_block(
            {"position": positions, "label": np.asarray([str(y) for y in self.labels[positions]]),
             "features": np.ascontiguousarray(self.features[positions])})])

    @property
    def nbytes(self) -> int:
        return self.features.nbytes


def read_positions(dataset: ray.data.Dataset) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(positions, labels, features) of a dataset made by `dataset(positions)`, sorted by position: the rows a
    consumer gets are a function of the positions it was given, whatever order Ray delivered the blocks in."""
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return np.zeros(0, np.int64), [], np.zeros((0, 0, 0), np.float16)
    positions = np.concatenate([p["position"] for p in parts])
    order = np.argsort(positions, kind="stable")
    labels = np.concatenate([p["label"] for p in parts])[order]
    return positions[order], [str(y) for y in labels], np.concatenate([p["features"] for p in parts])[order]


@dataclass
class FeatureSet(Pooled):
    """Cached images streamed from the cache: per image the driver holds its class code, content key and place in
    the cache (shard, row), never its features; Ray Data tasks read and verify the shards for whoever consumes them.
    Rows are in one canonical order, by class name then content key: a function of the images, not of the order the
    dataset listed them in, Ray Data delivered them in or the cache's shard layout."""

    cache: FeatureCache
    shards: list[str]
    shard: np.ndarray  # (N,) int32
    row: np.ndarray  # (N,) int32
    codes: np.ndarray  # (N,) int32 into `classes`
    classes: list[str]
    key_bytes: np.ndarray  # (N, L) uint8
    token_shape: tuple[int, ...] = ()
    skipped: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, cache: FeatureCache, index: CacheIndex, keys: np.ndarray, codes: np.ndarray, classes: list[str],
           skipped: Counter | None = None) -> "FeatureSet":
        """The images given by content key ((N, L) uint8) and label (codes into `classes`), every one of them cached
        (else an error naming how many)."""
        at = index.locate(keys)
        if (at < 0).any():
            raise ValueError(f"{int((at < 0).sum())} images have no features in the cache {cache.dir}")
        names = np.asarray(classes, dtype=str)
        rank = np.argsort(np.argsort(names, kind="stable"), kind="stable")  # class code -> its name's sort rank
        codes = rank[np.asarray(codes, dtype=np.int64)] if len(codes) else np.zeros(0, np.int64)
        order = np.lexsort((keys_as_bytes(keys), codes)) if len(codes) else np.zeros(0, int)  # by name, then key
        return cls(cache, index.shards, index.shard[at[order]], index.row[at[order]], codes[order].astype(np.int32),
                   sorted(str(c) for c in classes), np.ascontiguousarray(keys[order]), index.token_shape,
                   skipped or Counter())

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.codes] if len(self) else np.zeros(0, dtype=object)

    @property
    def keys(self) -> np.ndarray:
        return np.asarray([k.tobytes().hex() for k in self.key_bytes], dtype=object)

    def select(self, classes) -> "FeatureSet":
        wanted = [i for i, c in enumerate(self.classes) if c in set(classes)]
        return self.subset(np.isin(self.codes, wanted))

    def subset(self, mask) -> "FeatureSet":
        """The rows where the boolean `mask` is true (or at the given positions)."""
        return FeatureSet(self.cache, self.shards, self.shard[mask], self.row[mask], self.codes[mask], self.classes,
                          self.key_bytes[mask], self.token_shape)

    def dataset(self, positions: np.ndarray) -> ray.data.Dataset:
        """The rows at `positions` as a Ray Dataset of {position, label, features}: one read task per shard they lie
        in (read and verified whole), in shard order; read_positions puts them in position order."""
        positions = np.asarray(positions, dtype=np.int64)
        order = np.lexsort((positions, self.shard[positions]))
        positions = positions[order]
        shards = self.shard[positions]
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(positions) else np.zeros(0, int)
        stops = np.r_[starts[1:], len(positions)].astype(int)
        where = ray.put({"position": positions, "row": self.row[positions], "code": self.codes[positions]})
        items = [{"path": self.shards[shards[a]], "start": int(a), "stop": int(b)} for a, b in zip(starts, stops)]
        preserve_order()
        if not items:
            return FeatureTable(np.zeros((0, *self.token_shape), np.float16), np.zeros(0, dtype=object),
                                np.zeros(0, dtype=object)).dataset(np.zeros(0, np.int64))
        blocks = min(len(items), 1000)
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            read_rows, fn_kwargs={"cache": self.cache, "where": [where], "classes": list(self.classes)},
            batch_size=1, **read_options(blocks))

    def batches(self, size: int = 1024) -> Iterator[FeatureTable]:
        """Every row, streamed `size` at a time as in-memory tables, each with its rows' `positions` in this set: in
        the order the shards are read (each once), so a consumer that needs row order places rows by position
        (pool_rows); the driver holds one batch at a time."""
        if not len(self):
            return
        keys = self.key_bytes
        for batch in self.dataset(np.arange(len(self))).iter_batches(batch_size=size, batch_format="numpy"):
            at = batch["position"]
            yield FeatureTable(batch["features"], batch["label"].astype(object),
                               np.asarray([k.tobytes().hex() for k in keys[at]], dtype=object), positions=at)

    def by_class(self) -> Iterator[tuple[str, np.ndarray]]:
        """(class name, its rows' features as float32, in row order), classes in order of first appearance: one
        class in memory at a time."""
        for code in dict.fromkeys(self.codes.tolist()):
            yield self.classes[code], self.subset(self.codes == code).to_table().features.astype(np.float32)

    def to_table(self) -> FeatureTable:
        """The whole set in memory, rows in this set's order: for small sets (tools, tests), never an experiment's."""
        _, labels, features = read_positions(self.dataset(np.arange(len(self))))
        if not len(self):
            features = np.zeros((0, *self.token_shape), np.float16)
        return FeatureTable(features, np.asarray(labels, dtype=object), self.keys, self.skipped)

    @property
    def nbytes(self) -> int:
        """The bytes of the features it stands for (in the cache, not here)."""
        return len(self) * int(np.prod(self.token_shape, dtype=np.int64)) * 2


class EncodeBatch:
    """Ray Data actor: runs the frozen encoder on rows whose features are not cached yet and writes them to the cache
    as one shard per batch, here: the features never travel to the driver."""

    def __init__(self, stack: ModelStack, cache: FeatureCache, cached: CacheIndex, threads: int = 1):
        torch.set_num_threads(threads)
        self.stack, self.cache, self.cached, self._encoder = stack, cache, cached, None

    @property
    def encoder(self):
        """Loaded on the first cache miss: a fully cached pass never pays for the network."""
        if self._encoder is None:
            self._encoder = create_encoder(self.stack).eval()
        return self._encoder

    def __call__(self, batch: dict) -> dict:
        good = [i for i, e in enumerate(batch["error"]) if not e]
        hit = self.cached.locate(key_bytes([batch["key"][i] for i in good])) >= 0
        todo = [i for i, cached in zip(good, hit) if not cached]
        if todo:
            encoded = self.encoder.encode([np.asarray(batch["image"][i]) for i in todo]).numpy()
            self.cache.add([str(batch["key"][i]) for i in todo], encoded)
        computed = np.zeros(len(batch["key"]), dtype=bool)
        computed[todo] = True
        return {"key": batch["key"], "label": batch["label"], "error": batch["error"], "part": batch["part"],
                "computed": computed}


class Listing:
    """What the driver keeps of a listed split while it streams past: per good image its key bytes and class code
    (about 24 bytes), and the count of bad ones by reason."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.classes: dict[str, int] = {}
        self.skipped: Counter = Counter()

    def add(self, keys, labels, errors) -> None:
        good = np.asarray([not e for e in errors], dtype=bool)
        self.skipped.update(str(e).split(":")[0] for e in errors if e)
        self.keys.append(key_bytes(keys[good]))
        self.codes.append(np.asarray([self.classes.setdefault(str(y), len(self.classes)) for y in labels[good]],
                                     dtype=np.int32))

    def feature_set(self, cache: FeatureCache, index: CacheIndex) -> "FeatureSet":
        keys = [k for k in self.keys if len(k)]
        return FeatureSet.of(cache, index, np.concatenate(keys) if keys else np.zeros((0, 1), np.uint8),
                             np.concatenate(self.codes) if self.codes else np.zeros(0, np.int32), list(self.classes),
                             self.skipped)


def extract_features(parts: list[LabelledImages], stack: ModelStack, cache: FeatureCache,
                     actors: int = 2, batch_size: int = 64) -> list[FeatureSet]:
    """The cached features of every decodable image of each part (e.g. train and test), in one Ray Data pass that
    encodes what the cache lacks.

    Rows with an error are dropped and counted by reason. One pass means one pool of encoder
    actors (each a process that loads torch and the encoder) rather than one per part. The driver collects each
    row's key and label only; the index of the cache is built again after the pass, because another run may have
    stored some of these keys first (the oldest value wins).
    """
    index = cache.index()
    preserve_order()  # the sets' rows in the datasets' order
    tagged = [p.dataset.add_column("part", lambda batch, i=i: np.full(len(batch["key"]), i), batch_format="numpy")
              for i, p in enumerate(parts)]
    encoded = (tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]).map_batches(
        EncodeBatch, fn_constructor_kwargs={"stack": stack, "cache": cache, "cached": index},
        # each actor runs one torch thread; reserving half a CPU leaves room for the reading and
        # decoding tasks upstream, which would otherwise wait forever for a CPU on a small node
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.5, batch_size=batch_size, batch_format="numpy")
    collected = [Listing() for _ in parts]
    computed = 0
    for batch in encoded.select_columns(["key", "label", "error", "part", "computed"]).iter_batches(
            batch_size=1024, batch_format="numpy"):
        computed += int(batch["computed"].sum())
        for i, into in enumerate(collected):
            mine = batch["part"] == i
            into.add(batch["key"][mine], batch["label"][mine], batch["error"][mine])
    if computed:
        index = cache.index()
    sets = []
    for part in collected:
        if part.skipped:
            log.warning("skipped %d unreadable images: %s", sum(part.skipped.values()), dict(part.skipped))
        sets.append(part.feature_set(cache, index))
    log.info("features: %d images, %d computed, %d from cache", sum(map(len, sets)), computed,
             sum(map(len, sets)) - computed)
    return sets


def feature_sets_for(cfg: ExperimentConfig, encoder_identity: str, classes: list[str],
                     **dataset_overrides) -> tuple[FeatureSet, FeatureSet]:
    """The train and test split of `classes` as streamed sets of the feature cache (computed where missing)."""
    splits = load_dataset(cfg.dataset.model_copy(update=dataset_overrides), classes=classes)
    cache = FeatureCache(cfg.features_url, encoder_identity, cfg.storage.options)
    train, test = extract_features([splits.train, splits.test], cfg.stack, cache, actors=cfg.dataset.encoder_actors)
    require_training_images(train, classes)
    return train, test


def features_for(cfg: ExperimentConfig, encoder_identity: str, classes: list[str],
                 **dataset_overrides) -> tuple[FeatureTable, FeatureTable]:
    """As feature_sets_for, read into memory: for tools and tests on small sets (an experiment streams)."""
    train, test = feature_sets_for(cfg, encoder_identity, classes, **dataset_overrides)
    return train.to_table(), test.to_table()


def require_training_images(train, classes: list[str]) -> None:
    """A class without one decodable training image cannot be learned: fail here, naming it, before any task
    trains or publishes, instead of when its task comes (or never, with a projection that silently lacks it)."""
    missing = sorted(set(classes) - set(train.labels))
    if missing:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(train.skipped.items())) or "none"
        raise ValueError(f"{len(missing)} classes have no training images that decode: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} (undecodable training images skipped: {skipped}); "
                         "add readable images for them or leave them out (scenario.class_order / num_classes)")
