"""A dataset source becomes two splits (train, test) of labelled RGB images as Ray Datasets.

Sources, one module each (all give the rows described in rows.py):
- "quickdraw" (quickdraw.py): the embedded QuickDraw-345 archive, a fixed split per class.
- "folder" (folder.py): `<root>/<class>/<files>`, or with `train/` and `test/`, on a local path or any
  fsspec URL; without train/ and test/, a stable hash of each file's path decides its split.
- "imagenet_r", "cifar100", "tiny_imagenet" (layouts.py): the standard on-disk layouts of those
  benchmarks, with human-readable class names (docs/datasets.md).
- "parquet" (parquet.py): files with an image-bytes column and a class-name column, on any fsspec URL,
  read with Ray Data (docs/storage.md).

Shared by the sources: config.py (what a config says), rows.py (the row format, content keys, class
names, decoding), listing.py (folder listing and split rules). This package imports no model code
(torch, transformers): Ray workers unpickle the decoders and import it just to read images.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .config import DatasetConfig, ParquetColumns
from .folder import load_folder
from .layouts import load_cifar100, load_imagenet_r, load_tiny_imagenet
from .parquet import load_parquet
from .quickdraw import load_quickdraw
from .rows import DatasetSplits, LabelledImages

LOADERS: dict[str, Callable[[DatasetConfig, Sequence[str] | None], DatasetSplits]] = {
    "quickdraw": load_quickdraw, "folder": load_folder, "parquet": load_parquet,
    "imagenet_r": load_imagenet_r, "cifar100": load_cifar100, "tiny_imagenet": load_tiny_imagenet}


def load_dataset(config: DatasetConfig, classes: Sequence[str] | None = None) -> DatasetSplits:
    """Both splits of the configured source; `classes` (if given) keeps only rows of those classes."""
    return LOADERS[config.kind](config, classes)


def dataset_class_names(config: DatasetConfig) -> list[str]:
    """Every class of the source, without reading any image."""
    return load_dataset(config, classes=[]).class_names


__all__ = ["DatasetConfig", "DatasetSplits", "LabelledImages", "LOADERS", "ParquetColumns", "dataset_class_names",
           "load_dataset"]
