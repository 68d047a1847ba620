"""Benchmark layouts (ImageNet-R, CIFAR-100 python, Tiny-ImageNet) on small fixtures written in their exact layout."""
from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from cil_platform.config import load_config
from cil_platform.data import DatasetConfig, load_dataset
from cil_platform.data.layouts import imagenet_lemmas, parse_wordnet_words, wordnet_class_names
from cil_platform.paths import REPO_ROOT
from cil_platform.scenario import build_scenario
from tests.test_datasets import rows, sha1


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


RNG = np.random.default_rng(0)

# ---------------------------------------------------------------- ImageNet-R

R_WNIDS = {"n01443537": "goldfish", "n01484850": "great white shark", "n01494475": "hammerhead"}


@pytest.fixture
def imagenet_r(tmp_path):
    """tmp/imagenet-r/<wnid>/*.jpg: 10 images per class (one of goldfish's is corrupt), plus a README."""
    root = tmp_path / "imagenet-r"
    for wnid in R_WNIDS:
        for i in range(10):
            write(root / wnid / f"art_{i}.jpg", encoded(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8), "JPEG"))
    write(root / "n01443537" / "art_9.jpg", b"not a jpeg at all")
    write(root / "README.txt", b"ImageNet-R")
    return root


def test_imagenet_r_names_split_and_rows(imagenet_r):
    config = DatasetConfig(kind="imagenet_r", path=str(imagenet_r.parent))  # the folder above imagenet-r/ works too
    splits = load_dataset(config)
    assert splits.class_names == sorted(R_WNIDS.values())
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {name: 8 for name in R_WNIDS.values()}  # exact 80/20 per class
    assert Counter(r["label"] for r in test) == {name: 2 for name in R_WNIDS.values()}
    errors = [r for r in train + test if r["error"]]
    assert len(errors) == 1 and errors[0]["error"].startswith("not an image: ") and "art_9.jpg" in errors[0]["error"]
    good = [r for r in train + test if not r["error"]]
    assert all(r["image"].shape == (12, 10, 3) and r["image"].dtype == np.uint8 for r in good)
    on_disk = {sha1(p.read_bytes()) for p in imagenet_r.rglob("*.jpg")}
    assert {r["key"] for r in good} <= on_disk and not {r["key"] for r in train} & {r["key"] for r in test}

    # the split is fixed by the seed: the same again, another seed another split, and no other class moves
    again = load_dataset(DatasetConfig(kind="imagenet_r", path=str(imagenet_r)))
    assert sorted(r["key"] for r in rows(again.test)) == sorted(r["key"] for r in test)
    other = load_dataset(DatasetConfig(kind="imagenet_r", path=str(imagenet_r), split_seed=7))
    assert sorted(r["key"] for r in rows(other.test)) != sorted(r["key"] for r in test)
    (imagenet_r / "n01494475").rename(imagenet_r.parent / "moved-away")
    fewer = load_dataset(DatasetConfig(kind="imagenet_r", path=f"file://{imagenet_r}"), classes=["goldfish"])
    assert fewer.class_names == ["goldfish", "great white shark"]
    assert {r["key"] for r in rows(fewer.test)} == {r["key"] for r in test if r["label"] == "goldfish"}


def test_imagenet_r_presplit_copy_is_used_as_is(tmp_path):
    root = tmp_path / "imagenet-r"
    for split, n in [("train", 3), ("test", 1)]:
        for i in range(n):
            write(root / split / "n01443537" / f"{i}.png", encoded(RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8), "PNG"))
    splits = load_dataset(DatasetConfig(kind="imagenet_r", path=str(root)))
    assert splits.class_names == ["goldfish"]
    assert (splits.train.num_rows, splits.test.num_rows) == (3, 1)


def test_imagenet_r_wrong_layout_and_missing_path(tmp_path, imagenet_r):
    with pytest.raises(FileNotFoundError, match="not found.*nowhere"):
        load_dataset(DatasetConfig(kind="imagenet_r", path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset(DatasetConfig(kind="imagenet_r"))
    write(imagenet_r / "cat" / "0.jpg", encoded(np.zeros((4, 4, 3), np.uint8), "JPEG"))
    with pytest.raises(ValueError, match=r"unknown wnid \['cat'\]"):
        load_dataset(DatasetConfig(kind="imagenet_r", path=str(imagenet_r)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images.*imagenet-r/<wnid>"):
        load_dataset(DatasetConfig(kind="imagenet_r", path=str(tmp_path / "empty")))


def test_imagenet_r_preset_config_matches_the_loader_names():
    """configs/imagenet-r.yaml: 200 classes, B20-Inc20, its fixed class order in the names the loader gives."""
    cfg = load_config(REPO_ROOT / "configs" / "imagenet-r.yaml", ["dataset.path=/data/imagenet-r"])
    assert cfg.dataset.kind == "imagenet_r" and cfg.dataset.path == "/data/imagenet-r"
    synsets = Path(find_spec("timm").origin).parent / "data" / "_info" / "imagenet_r_synsets.txt"
    wnids = synsets.read_text().split()
    names = wordnet_class_names(wnids, imagenet_lemmas(), "timm's ImageNet-R synsets")
    assert len(set(names.values())) == 200
    assert sorted(cfg.scenario.class_order) == sorted(names.values())
    # PyCIL's order: sorted wnids (ImageFolder indices) permuted by np.random.seed(1993)
    permutation = np.random.RandomState(1993).permutation(200)
    assert cfg.scenario.class_order == [names[sorted(wnids)[i]] for i in permutation]
    scenario = build_scenario(cfg.scenario, cfg.scenario.class_order, cfg.seed)
    assert scenario.name == "B20-Inc20" and len(scenario) == 10
    assert [len(t.new_classes) for t in scenario] == [20] * 10


def test_wordnet_names_first_lemma_and_collisions():
    lemmas = parse_wordnet_words("n02012849\tcrane\nn03126707\tcrane\nn01443537\tgoldfish, Carassius auratus\n"
                                 "no tab here\n")
    names = wordnet_class_names(["n02012849", "n03126707", "n01443537"], lemmas, "test")
    assert names == {"n02012849": "crane (n02012849)", "n03126707": "crane (n03126707)", "n01443537": "goldfish"}
    with pytest.raises(ValueError, match="unknown wnid"):
        wordnet_class_names(["n99999999"], lemmas, "test")


# ---------------------------------------------------------------- CIFAR-100 (python version)

FINE = ["apple", "aquarium_fish", "maple_tree", "bear", "beaver"]


def cifar_batch(n: int, label_of, bytes_keys: bool, batch_label: str) -> tuple[dict, np.ndarray]:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": batch_label,
             "fine_labels": [label_of(i) for i in range(n)], "coarse_labels": [0] * n, "data": data}
    if bytes_keys:  # how the official pickles look when loaded with encoding="bytes"
        batch = {k.encode(): v for k, v in batch.items()}
    return batch, data


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train, train_data = cifar_batch(20, lambda i: i % 5, bytes_keys=True, batch_label="training batch 1 of 1")
    test, test_data = cifar_batch(10, lambda i: (i * 2) % 5, bytes_keys=False, batch_label="testing batch 1 of 1")
    (root / "train").write_bytes(pickle.dumps(train, protocol=2))
    (root / "test").write_bytes(pickle.dumps(test))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": FINE, "coarse_label_names": ["fruit"]}))
    return root, train_data, test_data


def test_cifar100_names_pixels_keys_and_caps(cifar):
    root, train_data, test_data = cifar
    splits = load_dataset(DatasetConfig(kind="cifar100", path=str(root)))
    assert splits.class_names == ["apple", "aquarium fish", "bear", "beaver", "maple tree"]
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {name.replace("_", " "): 4 for name in FINE}
    assert Counter(r["label"] for r in test) == {name.replace("_", " "): 2 for name in FINE}
    by_key = {r["key"]: r for r in train}
    for i in (0, 7, 19):  # rows are channel-first planes: pixel (r, c, ch) = data[ch * 1024 + r * 32 + c]
        image = train_data[i].reshape(3, 32, 32).transpose(1, 2, 0)
        row = by_key[sha1(np.ascontiguousarray(image).tobytes())]
        np.testing.assert_array_equal(row["image"], image)
        assert row["label"] == FINE[i % 5].replace("_", " ") and row["error"] == ""

    capped = load_dataset(DatasetConfig(kind="cifar100", path=f"file://{root.parent}", train_per_class=2,
                                        test_per_class=1), classes=["aquarium fish", "bear"])
    capped_train = rows(capped.train)
    # the first two of each class in file order: aquarium fish at 1, 6; bear at 3, 8
    expected = {sha1(np.ascontiguousarray(train_data[i].reshape(3, 32, 32).transpose(1, 2, 0)).tobytes())
                for i in (1, 6, 3, 8)}
    assert {r["key"] for r in capped_train} == expected
    assert Counter(r["label"] for r in rows(capped.test)) == {"aquarium fish": 1, "bear": 1}


def test_cifar100_wrong_layout_and_unsafe_pickles(cifar, tmp_path):
    root, _, _ = cifar
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(DatasetConfig(kind="cifar100", path=str(tmp_path / "missing")))
    cifar10 = tmp_path / "cifar-10-batches-py"
    cifar10.mkdir()
    (cifar10 / "batches.meta").write_bytes(pickle.dumps({"label_names": ["cat"]}))
    with pytest.raises(FileNotFoundError, match="no meta file.*CIFAR-10"):
        load_dataset(DatasetConfig(kind="cifar100", path=str(cifar10)))

    class Shell:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": Shell()}))
    with pytest.raises(ValueError, match="not a CIFAR-100 python pickle.*system is not allowed"):
        load_dataset(DatasetConfig(kind="cifar100", path=str(root)))
    (root / "meta").write_bytes(pickle.dumps({"coarse_label_names": ["fruit"]}))
    with pytest.raises(ValueError, match="no 'fine_label_names'"):
        load_dataset(DatasetConfig(kind="cifar100", path=str(root)))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": FINE}))
    (root / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}))
    with pytest.raises(ValueError, match="'data' must be uint8 of shape"):
        load_dataset(DatasetConfig(kind="cifar100", path=str(root)))


# ---------------------------------------------------------------- Tiny-ImageNet

T_WNIDS = ["n01443537", "n02012849", "n03126707"]  # goldfish, and the two WordNet "crane"s
WORDS = ("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\nn02012849\tcrane\n"
         "n03126707\tcrane\nn02124075\tEgyptian cat\n")


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(T_WNIDS) + "\n")
    (root / "words.txt").write_text(WORDS)
    for wnid in T_WNIDS:
        for i in range(4):
            write(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                  encoded(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8), "JPEG"))
        write(root / "train" / wnid / f"{wnid}_boxes.txt", b"n_0.JPEG\t0\t0\t7\t7\n")
    lines = []
    for i, wnid in enumerate(T_WNIDS * 2):
        write(root / "val" / "images" / f"val_{i}.JPEG", encoded(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8), "JPEG"))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t7\t7")
    lines.append(f"val_99.JPEG\t{T_WNIDS[0]}\t0\t0\t7\t7")  # listed, but the file is missing
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write(root / "test" / "images" / "test_0.JPEG", encoded(np.zeros((8, 8, 3), np.uint8), "JPEG"))  # unlabelled
    return root


def test_tiny_imagenet_train_folders_val_annotations_and_names(tiny):
    splits = load_dataset(DatasetConfig(kind="tiny_imagenet", path=str(tiny.parent)))
    assert splits.class_names == ["crane (n02012849)", "crane (n03126707)", "goldfish"]
    train, test = rows(splits.train), rows(splits.test)
    assert Counter(r["label"] for r in train) == {name: 4 for name in splits.class_names}  # boxes files not read
    assert all(r["error"] == "" and r["image"].shape == (8, 8, 3) for r in train)
    assert Counter(r["label"] for r in test) == {"goldfish": 3, "crane (n02012849)": 2, "crane (n03126707)": 2}
    missing = [r for r in test if r["error"]]
    assert len(missing) == 1 and missing[0]["error"].startswith("unreadable: ") and "val_99.JPEG" in missing[0]["error"]
    val_0 = sha1((tiny / "val" / "images" / "val_0.JPEG").read_bytes())
    assert [r["label"] for r in test if r["key"] == val_0] == ["goldfish"]
    assert sha1((tiny / "test" / "images" / "test_0.JPEG").read_bytes()) not in {r["key"] for r in train + test}


def test_tiny_imagenet_wrong_layouts(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(DatasetConfig(kind="tiny_imagenet", path=str(tmp_path / "absent")))
    annotations = tiny / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text + "val_0.JPEG\tn09999999\t0\t0\t7\t7\n")
    with pytest.raises(ValueError, match=r"line 8.*unknown wnid 'n09999999'"):
        load_dataset(DatasetConfig(kind="tiny_imagenet", path=str(tiny)))
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match="val/val_annotations.txt missing"):
        load_dataset(DatasetConfig(kind="tiny_imagenet", path=str(tiny)))
    annotations.write_text(text)
    (tiny / "words.txt").write_text(WORDS.replace("n03126707\tcrane\n", ""))
    with pytest.raises(ValueError, match=r"unknown wnid \['n03126707'\] in words.txt"):
        load_dataset(DatasetConfig(kind="tiny_imagenet", path=str(tiny)))
