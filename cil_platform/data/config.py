"""What a dataset config says: the source, its location and the per-class caps (pydantic only, so the
run config can embed it without importing any loader)."""
from __future__ import annotations

from typing import Any, Literal

import pydantic


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
    encoder_actors: int = pydantic.Field(default=2, ge=1)  # Ray Data actors encoding images into the feature cache
    # fsspec options for the path's URL (e.g. s3 endpoint, credentials): never in repr() (nor in logs of it)
    storage_options: dict[str, Any] = pydantic.Field(default_factory=dict, repr=False)
    columns: ParquetColumns = ParquetColumns()  # parquet only
