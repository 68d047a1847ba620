"""The rows every source produces, and the helpers the sources share to make them.

Every row is {"key", "label", "image", "error"}. `key` is the sha1 of the image content (the
feature-cache key). Images are decoded by gmm_model.images.decode_rgb, the decoder the service uses too.
A file that cannot be read or decoded does not stop the run: its row carries
`error` = "<reason>: <path> ..." and a 1x1 black image; downstream code drops and counts those rows.
Labels are class names normalised once here, so every source names a class the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

from gmm_model.images import ImageDecodeError, decode_rgb
from gmm_model.spec import normalise_class_name

ROWS_PER_BLOCK = 256  # in-memory blocks this size spread over the encoder actors (2048: 72 s vs 44 s for 3,000 images)
ERROR_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
MAX_PIXELS = 8192 * 8192  # checked from the header, before decoding: a larger image is "too large"


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


# ---------------------------------------------------------------- keys and class names

def sha1(data: bytes) -> str:
    """Hex sha1: the content key of an image, and the stable hash behind every computed split."""
    return hashlib.sha1(data).hexdigest()


def normalised_names(raw_names: Sequence[str], where: str) -> dict[str, str]:
    """raw name -> normalised name; two raw names that collapse to one name are an error."""
    seen: dict[str, str] = {}
    for raw in raw_names:
        name = normalise_class_name(raw)
        if name in seen and seen[name] != raw:
            raise ValueError(f"class names {seen[name]!r} and {raw!r} in {where} both normalise to {name!r}")
        seen[name] = raw
    return {raw: name for name, raw in seen.items()}


def wanted_classes(classes: Sequence[str] | None, class_names: Sequence[str]) -> set[str]:
    """The normalised names of `classes`, all of which must be in the dataset (None: every class)."""
    if classes is None:
        return set(class_names)
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of names, not the string {classes!r}")
    wanted = {normalise_class_name(c) for c in classes}
    unknown = sorted(wanted - set(class_names))
    if unknown:
        raise ValueError(f"unknown classes {unknown}: not among the dataset's {len(class_names)} classes")
    return wanted


# ---------------------------------------------------------------- rows

def arrays_to_rows(images: np.ndarray, labels: list[str], keys: list[str]) -> LabelledImages:
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


def _empty_table() -> pa.Table:
    return pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                     "image": ArrowTensorArray.from_numpy(np.zeros((0, 1, 1, 3), np.uint8)),
                     "error": pa.array([], pa.string())})


def empty_rows() -> LabelledImages:
    """No rows, with the columns every loader produces."""
    return LabelledImages(dataset=ray.data.from_arrow(_empty_table()), num_rows=0)


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


def _decode_one(path: str, size: int, data, max_bytes: int) -> tuple[str, np.ndarray, str]:
    """(key, RGB uint8 image, error) for one file; key is "" when the bytes were never read."""
    if size > max_bytes:
        return "", ERROR_IMAGE, f"too large: {path} ({size} bytes > {max_bytes})"
    if isinstance(data, BaseException):
        return "", ERROR_IMAGE, f"unreadable: {path}: {type(data).__name__}: {data}"
    if len(data) > max_bytes:  # the file grew after listing
        return "", ERROR_IMAGE, f"too large: {path} ({len(data)} bytes > {max_bytes})"
    key = sha1(data)
    try:
        return key, decode_rgb(data, MAX_PIXELS), ""
    except ImageDecodeError as error:
        detail = "" if error.reason == "not an image" else f": {error.detail}"
        return key, ERROR_IMAGE, f"{error.reason}: {path}{detail}"
