"""Image folders: `<root>/<class>/<files>`, or `<root>/train/<class>/...` with `<root>/test/<class>/...`,
on a local path or any fsspec URL. Without train/ and test/, a stable hash of each file's relative path
puts it in test with probability `test_fraction`, so adding files never moves others.

Files are listed on the driver and read and decoded by Ray Data workers, a batch at a time; the
benchmark layouts (layouts.py) reuse this listing, splitting and reading.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import pyarrow as pa
import ray

from ..storage import open_storage
from .config import DatasetConfig
from .listing import in_test, list_files, presplit, subfolders
from .rows import DatasetSplits, LabelledImages, decode_contents, empty_rows, normalised_names, wanted_classes

log = logging.getLogger(__name__)

FILES_PER_BATCH = 32  # files read and decoded per map_batches call
READ_THREADS = 8  # concurrent reads per batch


def load_folder(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    fs, root = folder_root(config)
    files = list_files(fs, root)  # relative path -> size, hidden entries removed
    split = presplit_class_files(fs, root, files, config.path)
    train, test = split or hash_split(class_files(fs, root, "", files), config.test_fraction)
    if not train and not test:
        raise ValueError(f"no images in {config.path}: expected <root>/<class>/<image files>, "
                         "or <root>/train/<class>/... and <root>/test/<class>/...")
    return file_splits(fs, root, train, test, config, classes, f"image folder {config.path}")


def folder_root(config: DatasetConfig):
    """(filesystem, root path) of the configured folder, which must exist."""
    if not config.path:
        raise ValueError(f"dataset kind {config.kind!r} needs a path (local path or fsspec URL)")
    storage = open_storage(config.path, config.storage_options)
    fs, root = storage.fs, storage.path.rstrip("/") or "/"
    if not fs.exists(root):
        raise FileNotFoundError(f"dataset folder not found: {config.path}")
    if not fs.isdir(root):
        raise NotADirectoryError(f"dataset path is not a folder: {config.path}")
    return fs, root


# ---------------------------------------------------------------- listing and splitting

def class_files(fs, root: str, split: str, files: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Normalised class -> sorted [(relative path, size)] for the class folders of root/split.

    Files may sit in nested folders inside a class folder; files outside any class folder (a README
    beside the classes) are ignored. A class folder without files is skipped with a warning rather
    than failing: it is usually a left-over of data preparation, and no experiment can use it.
    """
    base = f"{root.rstrip('/')}/{split}" if split else root
    raw_names = subfolders(fs, base)
    normalised = normalised_names(raw_names, base)
    depth = 1 if split else 0  # index of the class folder in a relative path
    grouped: dict[str, list[tuple[str, int]]] = {raw: [] for raw in raw_names}
    for rel, size in files.items():
        parts = rel.split("/")
        if len(parts) > depth + 1 and (not split or parts[0] == split) and parts[depth] in grouped:
            grouped[parts[depth]].append((rel, size))
    result: dict[str, list[tuple[str, int]]] = {}
    for raw, members in grouped.items():
        if members:
            result[normalised[raw]] = sorted(members)
        else:
            log.warning("skipping empty class folder %s/%s", base, raw)
    return result


def presplit_class_files(fs, root: str, files: dict[str, int], path: str) -> tuple[dict, dict] | None:
    """The class files of root/train and root/test when both exist; None when neither does."""
    if presplit(fs, root, path):
        return class_files(fs, root, "train", files), class_files(fs, root, "test", files)
    return None


def hash_split(by_class: dict[str, list[tuple[str, int]]], test_fraction: float) -> tuple[dict, dict]:
    """Each file to test or train by the stable coin of its relative path (`in_test`)."""
    train: dict[str, list[tuple[str, int]]] = {}
    test: dict[str, list[tuple[str, int]]] = {}
    for name, members in by_class.items():
        for rel, size in members:
            (test if in_test(rel, test_fraction) else train).setdefault(name, []).append((rel, size))
    return train, test


# ---------------------------------------------------------------- reading and decoding

def file_splits(fs, root: str, train: dict[str, list[tuple[str, int]]], test: dict[str, list[tuple[str, int]]],
                config: DatasetConfig, classes: Sequence[str] | None, source: str,
                attribution: str | None = None) -> DatasetSplits:
    """Both splits from {class name: [(path relative to root, size)]}, read and decoded by Ray Data."""
    class_names = sorted(set(train) | set(test))
    wanted = wanted_classes(classes, class_names)
    return DatasetSplits(
        train=_files_to_rows(fs, root, train, wanted, config.train_per_class, config.max_image_bytes),
        test=_files_to_rows(fs, root, test, wanted, config.test_per_class, config.max_image_bytes),
        class_names=class_names, source=source, attribution=attribution)


def _files_to_rows(fs, root: str, by_class: dict[str, list[tuple[str, int]]], wanted: set[str],
                   per_class: int | None, max_bytes: int) -> LabelledImages:
    items = [{"path": f"{root.rstrip('/')}/{rel}", "label": name, "size": size}
             for name in sorted(by_class) if name in wanted
             for rel, size in by_class[name][:per_class]]
    if not items:
        return empty_rows()
    blocks = max(1, min(len(items) // FILES_PER_BATCH, 200))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _decode_batch, fn_kwargs={"fs": fs, "max_bytes": max_bytes}, batch_size=FILES_PER_BATCH,
        batch_format="pyarrow")
    return LabelledImages(dataset=dataset, num_rows=len(items))


def _decode_batch(batch: pa.Table, fs, max_bytes: int) -> pa.Table:
    """Read and decode one batch of files; failures become rows with an error, never exceptions."""
    paths = batch.column("path").to_pylist()
    sizes = batch.column("size").to_pylist()
    # Threads hide object-store latency; one cat_file per path (fs.cat(list) would glob "[", "*").
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        contents = list(pool.map(lambda p, s: _read(fs, p, s, max_bytes), paths, sizes))
    return decode_contents(paths, sizes, contents, batch.column("label"), max_bytes)


def _read(fs, path: str, size: int, max_bytes: int) -> bytes | BaseException | None:
    """The file's bytes, the exception that stopped the read, or None when it is too large to read."""
    if size > max_bytes:
        return None
    try:
        return fs.cat_file(path)
    except Exception as exc:  # vanished, permission denied, network: reported on the row
        return exc
