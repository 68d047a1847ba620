"""Parquet datasets (encoded image bytes + class name per row) on any fsspec URL, read with Ray Data.

Columns (`dataset.columns`): `image` holds the encoded image (binary, or Hugging Face's image struct
{bytes, path}); `label` the class name (a string; normalised like folder names); `split` is optional.
Splits, as for image folders: `<path>/train/` and `<path>/test/` sub-folders; else a split column
(rows whose value is neither "train" nor "test", e.g. "validation", are left out with a warning);
else a stable hash of each image's content puts it in test with probability `test_fraction`, so
adding rows moves no other row. Per-class caps keep the N images of a class with the smallest
content hash: a fixed order that does not depend on how rows are spread over files or blocks.

Image bytes are fetched from storage once: a first Ray Data pass labels and hashes every row of the
wanted classes and keeps its bytes in Ray's object store (spilled to local disk when large); the
driver picks each split's rows from the hashes (exact row counts, caps); decoding is the image-folder
loader's (`rows.decode_contents`), lazily per split, so corrupt bytes become counted error rows alike.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..storage import open_storage
from .config import DatasetConfig
from .listing import in_test, list_files, presplit
from .rows import DatasetSplits, LabelledImages, decode_contents, empty_rows, normalised_names, sha1, wanted_classes

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
ROWS_PER_DECODE = 32  # images decoded per map_batches call


def load_parquet(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    if not config.path:
        raise ValueError("dataset kind 'parquet' needs a path (a .parquet file or a folder; local path or fsspec URL)")
    storage = open_storage(config.path, config.storage_options)
    sources = _parquet_files(storage.fs, storage.path, config.path)
    reads = {split: ray.data.read_parquet(files, filesystem=storage.arrow, include_paths=True)
             for split, files in sources.items()}
    split_column = _check_columns(reads, config, by_dir="" not in sources)

    columns = config.columns
    labels = [_labels(ds, columns.label) for ds in reads.values()]
    raw_labels = sorted(set().union(*(found for found, _ in labels)))
    unlabelled = sum(nulls for _, nulls in labels)
    if unlabelled:
        log.warning("parquet dataset %s: left out %d rows whose %r is null (no class name)", config.path,
                    unlabelled, columns.label)
    normalised = normalised_names(raw_labels, config.path)
    class_names = sorted(set(normalised.values()))
    if not class_names:
        raise ValueError(f"no labelled rows in parquet dataset {config.path}")
    wanted = wanted_classes(classes, class_names)
    source = f"parquet {config.path}"
    if not wanted:  # only the class names were asked for: no image is read
        return DatasetSplits(empty_rows(), empty_rows(), class_names, source, None)

    names = {raw: name for raw, name in normalised.items() if name in wanted}
    needed = [columns.image, columns.label, "path", *([split_column] if split_column else [])]
    # one materialized dataset per source (not a union of them: Ray Data's union stalled on a busy 2-CPU node)
    fetched = {split: ds.select_columns(needed).map_batches(
                   _label_and_hash, batch_format="pyarrow",
                   fn_kwargs={"columns": columns, "names": names, "split": split, "split_column": split_column,
                              "test_fraction": config.test_fraction, "max_bytes": config.max_image_bytes}).materialize()
               for split, ds in reads.items()}
    index = pd.concat([raw.select_columns(["key", "label", "split"]).to_pandas() for raw in fetched.values()])
    _warn_other_splits(index, config.path, split_column)
    caps = {"train": config.train_per_class, "test": config.test_per_class}
    splits = {split: _split_rows(fetched.get(split, fetched.get("")), index, split, caps[split],
                                 config.max_image_bytes) for split in SPLITS}
    return DatasetSplits(splits["train"], splits["test"], class_names, source, None)


def _parquet_files(fs, root: str, url: str) -> dict[str, list[str]]:
    """{"train": files, "test": files} for train/ and test/ sub-folders, else {"": files}."""
    if not fs.exists(root):
        raise FileNotFoundError(f"parquet dataset not found: {url}")
    if fs.isfile(root):
        return {"": [root]}
    files = sorted(rel for rel in list_files(fs, root) if rel.endswith(".parquet"))
    groups = {split: [rel for rel in files if rel.startswith(f"{split}/")] for split in SPLITS} \
        if presplit(fs, root, url) else {"": files}
    for split, members in groups.items():
        if not members:
            raise ValueError(f"no .parquet files in {url}{'/' + split if split else ''}")
    return {split: [f"{root.rstrip('/')}/{rel}" for rel in members] for split, members in groups.items()}


def _check_columns(reads: dict[str, ray.data.Dataset], config: DatasetConfig, by_dir: bool) -> str | None:
    """Fail early, naming the column, when the image or label column is missing or of the wrong type;
    returns the split column to use, if any."""
    columns = config.columns
    split_column = None
    for ds in reads.values():
        schema = ds.schema()
        types = dict(zip(schema.names, schema.types))
        for field, name in (("image", columns.image), ("label", columns.label)):
            if name not in types:
                raise ValueError(f"parquet dataset {config.path} has no {field} column {name!r} (columns: "
                                 f"{', '.join(n for n in schema.names if n != 'path')}); set dataset.columns.{field}")
        image_type, label_type = types[columns.image], types[columns.label]
        if not (_is_binary(image_type) or (pa.types.is_struct(image_type)
                                           and image_type.get_field_index("bytes") >= 0)):
            raise ValueError(f"parquet column {columns.image!r} in {config.path} is {image_type}: expected image "
                             "bytes (binary) or a struct with a 'bytes' field")
        if not _is_string(label_type):
            raise ValueError(f"parquet column {columns.label!r} in {config.path} is {label_type}: expected class "
                             "names (strings); map integer labels to names before writing the parquet")
        if not by_dir and columns.split in types:
            split_column = columns.split
    return split_column


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _labels(ds: ray.data.Dataset, column: str) -> tuple[set[str], int]:
    """The column's distinct non-null values and how many rows are null, from a read of that column alone.
    (Dataset.unique is an all-to-all aggregation whose actors can wait forever for CPUs on a small, busy node.)"""
    found = ds.select_columns([column]).map_batches(_block_labels, fn_kwargs={"column": column},
                                                    batch_format="pyarrow", batch_size=None).to_pandas()
    return set(found["value"].dropna()), int(found["nulls"].sum())


def _block_labels(batch: pa.Table, column: str) -> pa.Table:
    """One block's distinct labels (nulls 0), and one row (value null) counting its null labels."""
    values = batch.column(column).to_pylist()
    distinct = sorted({v for v in values if v is not None})
    return pa.table({"value": pa.array([*distinct, None], pa.string()),
                     "nulls": pa.array([0] * len(distinct) + [values.count(None)], pa.int64())})


def _label_and_hash(batch: pa.Table, columns, names: dict[str, str], split: str, split_column: str | None,
                    test_fraction: float, max_bytes: int) -> pa.Table:
    """Rows of the wanted classes with their content key and split; bytes over the size limit are
    dropped here (the decoder reports them as too large) so they never reach the object store."""
    image = batch.column(columns.image)
    if pa.types.is_struct(image.type):
        image = pc.struct_field(image, "bytes")
    labels = batch.column(columns.label).to_pylist()
    contents = image.to_pylist()
    paths = batch.column("path").to_pylist()
    given = batch.column(split_column).to_pylist() if split_column else None
    out = {"key": [], "label": [], "split": [], "where": [], "size": [], "data": []}
    for i, (raw, data) in enumerate(zip(labels, contents)):
        if raw not in names:
            continue
        key = sha1(data) if data is not None else ""
        if split:
            row_split = split
        elif given is not None:
            row_split = str(given[i])
        else:
            row_split = "test" if in_test(key, test_fraction) else "train"
        size = len(data) if data is not None else 0
        out["key"].append(key)
        out["label"].append(names[raw])
        out["split"].append(row_split)
        out["where"].append(f"{paths[i]} (label {raw!r})")
        out["size"].append(size)
        out["data"].append(data if size <= max_bytes else None)
    return pa.table({"key": pa.array(out["key"], pa.string()), "label": pa.array(out["label"], pa.string()),
                     "split": pa.array(out["split"], pa.string()), "where": pa.array(out["where"], pa.string()),
                     "size": pa.array(out["size"], pa.int64()), "data": pa.array(out["data"], pa.large_binary())})


def _warn_other_splits(index, path: str, split_column: str | None) -> None:
    other = Counter(s for s in index["split"] if s not in SPLITS)
    if other:
        log.warning("parquet dataset %s: left out %d rows whose %r is not train/test: %s",
                    path, sum(other.values()), split_column, dict(other))


def _split_rows(raw: ray.data.Dataset, index, split: str, cap: int | None, max_bytes: int) -> LabelledImages:
    """The rows of one split (at most `cap` per class, smallest content keys first), decoded lazily."""
    rows = index[index["split"] == split]
    keep = None
    if cap is not None:
        chosen = {k for _, group in rows.groupby("label") for k in sorted(set(group["key"]))[:cap]}
        rows = rows[rows["key"].isin(chosen)]
        keep = pa.array(sorted(chosen), pa.string())
    if len(rows) == 0:
        return empty_rows()
    dataset = raw.map_batches(_decode_split, batch_size=ROWS_PER_DECODE, batch_format="pyarrow",
                              fn_kwargs={"split": split, "keep": keep, "max_bytes": max_bytes})
    return LabelledImages(dataset=dataset, num_rows=len(rows))


def _decode_split(batch: pa.Table, split: str, keep: pa.Array | None, max_bytes: int) -> pa.Table:
    mask = pc.equal(batch.column("split"), split)
    if keep is not None:
        mask = pc.and_(mask, pc.is_in(batch.column("key"), value_set=keep))
    rows = batch.filter(mask)
    sizes = rows.column("size").to_pylist()
    contents = [data if data is not None or size > max_bytes else ValueError("the image column is null")
                for data, size in zip(rows.column("data").to_pylist(), sizes)]
    return decode_contents(rows.column("where").to_pylist(), sizes, contents, rows.column("label"), max_bytes)
