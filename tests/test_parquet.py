"""Parquet datasets (image bytes + class name) on a local path and on S3 (moto), read with Ray Data."""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from cil_platform.data import DatasetConfig, ParquetColumns, load_dataset
from cil_platform.storage import open_storage
from tests.test_datasets import jpeg_bytes as jpeg
from tests.test_datasets import png_bytes as png
from tests.test_datasets import rows, sha1


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(url, storage options) of an empty dataset location."""
    if request.param == "local":
        return str(tmp_path / "data"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.url("data"), bucket.options


def write_parquet(url: str, options: dict, relative: str, columns: dict) -> None:
    storage = open_storage(url, options)
    path = f"{storage.path}/{relative}"
    storage.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(pa.table(columns), path, filesystem=storage.arrow)




def reasons(rows_: list[dict]) -> Counter:
    """What extract_features counts: the reason before the first colon of each error."""
    return Counter(r["error"].split(":")[0] for r in rows_ if r["error"])


RNG = np.random.default_rng(0)
CATS = [RNG.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8) for i in range(4)]
DOGS = [RNG.integers(0, 256, (7, 7, 3), dtype=np.uint8) for _ in range(3)]
BAD = {"not an image": b"definitely not an image",
       "corrupt image": jpeg(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))[:300]}  # header intact, data cut
LIMIT = 2000  # max_image_bytes: the big PNG below is over it
BIG = png(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_split_column_decodes_like_the_folder_loader_and_counts_bad_rows_alike(place, tmp_path, caplog):
    url, options = place
    assert len(BIG) > LIMIT
    # two files; a null image, a corrupt and a non-image row, one over the size limit, one validation row
    write_parquet(url, options, "part-0.parquet", {
        "image": [png(a) for a in CATS] + [BAD["not an image"]],
        "label": ["cat"] * 4 + ["dog"],
        "split": ["train", "train", "train", "test", "train"]})
    write_parquet(url, options, "nested/part-1.parquet", {
        "image": [png(a) for a in DOGS] + [BAD["corrupt image"], None, BIG, png(DOGS[0][::-1])],
        "label": ["dog", "dog", "dog", "dog", "dog", " hot   dog", "dog"],
        "split": ["train", "test", "train", "test", "train", "test", "validation"]})

    config = DatasetConfig(kind="parquet", path=url, storage_options=options, max_image_bytes=LIMIT)
    with caplog.at_level(logging.WARNING, logger="cil_platform.data.parquet"):
        splits = load_dataset(config)
    assert "validation" in caplog.text and "left out 1 rows" in caplog.text
    assert splits.class_names == ["cat", "dog", "hot dog"]
    assert splits.source == f"parquet {url}"
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {"cat": 3, "dog": 4}
    assert Counter(r["label"] for r in test) == {"cat": 1, "dog": 2, "hot dog": 1}
    assert reasons(train) == {"not an image": 1, "unreadable": 1}
    assert reasons(test) == {"corrupt image": 1, "too large": 1}
    null = next(r for r in train if r["error"].startswith("unreadable"))
    assert "the image column is null" in null["error"] and "part-1.parquet" in null["error"]
    assert all(r["image"].shape == (1, 1, 3) for r in train + test if r["error"])
    assert next(r for r in test if r["error"].startswith("too large"))["key"] == ""

    by_key = {r["key"]: r for r in train + test if not r["error"]}
    for array in CATS + DOGS:  # lossless PNG: the exact pixels, keyed by the sha1 of the bytes
        row = by_key[sha1(png(array))]
        assert row["image"].dtype == np.uint8
        np.testing.assert_array_equal(row["image"], array)
    assert by_key[sha1(png(CATS[3]))]["label"] == "cat"

    # the same bytes as an image folder: the folder loader reports the same reasons
    folder = tmp_path / "folder"
    for name, data in [("cat/a.png", png(CATS[0])), ("dog/x.bin", BAD["not an image"]),
                       ("dog/y.jpg", BAD["corrupt image"]), ("dog/z.png", BIG)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    folder_rows = rows(load_dataset(DatasetConfig(kind="folder", path=str(folder), test_fraction=0.0,
                                                  max_image_bytes=LIMIT)).train)
    assert reasons(folder_rows) == {"not an image": 1, "corrupt image": 1, "too large": 1}


@pytest.mark.parametrize("place", ["local"], indirect=True)  # S3 reads go the same way: the test above covers them
def test_train_test_subfolders_struct_images_caps_and_class_filter(place):
    url, options = place
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face's Image feature
    images = [png(a) for a in CATS] + [png(a) for a in DOGS]
    labels = ["cat"] * 4 + ["dog"] * 3
    write_parquet(url, options, "train/0.parquet", {
        "pixels": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)], struct),
        "name": labels})
    write_parquet(url, options, "test/0.parquet", {
        "pixels": pa.array([{"bytes": png(CATS[0][::-1]), "path": "t.png"}], struct), "name": ["cat"]})
    columns = ParquetColumns(image="pixels", label="name")

    splits = load_dataset(DatasetConfig(kind="parquet", path=url, storage_options=options, columns=columns,
                                        train_per_class=2))
    assert splits.class_names == ["cat", "dog"]
    train = rows(splits.train)
    assert Counter(r["label"] for r in train) == {"cat": 2, "dog": 2}
    # the cap keeps the images with the smallest content hashes: independent of file and block layout
    assert {r["key"] for r in train if r["label"] == "cat"} == set(sorted(sha1(png(a)) for a in CATS)[:2])
    test = rows(splits.test)
    assert [r["label"] for r in test] == ["cat"]
    np.testing.assert_array_equal(test[0]["image"], CATS[0][::-1])

    only_dogs = load_dataset(DatasetConfig(kind="parquet", path=url, storage_options=options, columns=columns),
                             classes=["dog"])
    assert Counter(r["label"] for r in rows(only_dogs.train)) == {"dog": 3} and only_dogs.test.num_rows == 0
    assert load_dataset(DatasetConfig(kind="parquet", path=url, storage_options=options, columns=columns),
                        classes=[]).train.num_rows == 0
    with pytest.raises(ValueError, match="unknown classes.*bird"):
        load_dataset(DatasetConfig(kind="parquet", path=url, storage_options=options, columns=columns),
                     classes=["bird"])


def test_hash_split_is_stable_and_a_new_file_moves_no_row(tmp_path):
    url = str(tmp_path / "data")
    arrays = [RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(30)]
    write_parquet(url, {}, "a.parquet", {"image": [png(a) for a in arrays], "label": ["cat", "dog"] * 15})
    config = DatasetConfig(kind="parquet", path=url, test_fraction=0.5)
    first = load_dataset(config)
    test_keys = {r["key"] for r in rows(first.test)}
    assert first.train.num_rows + first.test.num_rows == 30 and 0 < len(test_keys) < 30

    write_parquet(url, {}, "b.parquet", {"image": [png(np.full((3, 3, 3), 9, np.uint8))], "label": ["cat"]})
    grown = load_dataset(config)
    assert {r["key"] for r in rows(grown.test)} - {sha1(png(np.full((3, 3, 3), 9, np.uint8)))} == test_keys
    assert grown.train.num_rows + grown.test.num_rows == 31


def test_bad_paths_and_columns_are_clear_errors(place):
    url, options = place

    def load(**fields):
        return load_dataset(DatasetConfig(kind="parquet", path=url, storage_options=options, **fields))

    with pytest.raises(FileNotFoundError, match="parquet dataset not found"):
        load()
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset(DatasetConfig(kind="parquet"))

    write_parquet(url, options, "x.parquet", {"img": [png(CATS[0])], "label": ["cat"], "n": [1]})
    with pytest.raises(ValueError, match="no image column 'image' \\(columns: img, label, n\\).*columns.image"):
        load()
    with pytest.raises(ValueError, match="no label column 'category'"):
        load(columns=ParquetColumns(image="img", label="category"))
    with pytest.raises(ValueError, match="column 'n' .* int64: expected class names"):
        load(columns=ParquetColumns(image="img", label="n"))
    with pytest.raises(ValueError, match="column 'label' .* string: expected image bytes"):
        load(columns=ParquetColumns(image="label"))
    assert load(columns=ParquetColumns(image="img")).class_names == ["cat"]

    write_parquet(url, options, "train/y.parquet", {"img": [png(CATS[0])], "label": ["cat"]})
    with pytest.raises(ValueError, match="only one of train/ and test/"):
        load(columns=ParquetColumns(image="img"))


def test_rows_without_a_label_are_left_out_and_counted(tmp_path, caplog):
    url = str(tmp_path / "data")
    images = [png(image) for image in CATS[:3]]
    write_parquet(url, {}, "part-0.parquet", {"image": pa.array(images, pa.binary()),
                                              "label": pa.array(["cat", None, None], pa.string()),
                                              "split": pa.array(["train"] * 3, pa.string())})
    write_parquet(url, {}, "part-1.parquet", {"image": pa.array(images[:1], pa.binary()),
                                              "label": pa.array([None], pa.string()),
                                              "split": pa.array(["test"], pa.string())})
    with caplog.at_level(logging.WARNING):
        splits = load_dataset(DatasetConfig(kind="parquet", path=url))
    assert splits.class_names == ["cat"] and len(rows(splits.train)) == 1
    assert "left out 3 rows whose 'label' is null" in caplog.text
