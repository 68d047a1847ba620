"""The standard on-disk layouts of ImageNet-R, CIFAR-100 and Tiny-ImageNet, from a user-given path.

Each becomes the same two splits of rows as every other source (rows.py): image files go through
the folder loader's listing, reading and decoding (corrupt files are counted, not fatal); CIFAR-100's
pickled arrays become in-memory rows keyed by the sha1 of their pixels. Class names are human-readable:
WordNet ids become their first lemma ("n01443537" -> "goldfish"), CIFAR's "aquarium_fish" becomes
"aquarium fish". docs/datasets.md describes each layout, its names and its split.

The path may be the layout's own folder (imagenet-r/, cifar-100-python/, tiny-imagenet-200/) or the
folder that holds it; a local path or any fsspec URL.
"""
from __future__ import annotations

import importlib.util
import io
import pickle
import posixpath
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import DatasetConfig
from .folder import class_files, file_splits, folder_root, presplit_class_files
from .listing import list_files, subfolders
from .rows import DatasetSplits, LabelledImages, arrays_to_rows, normalised_names, sha1, wanted_classes

IMAGENET_R_DIR = "imagenet-r"
CIFAR100_DIR = "cifar-100-python"
TINY_IMAGENET_DIR = "tiny-imagenet-200"
CIFAR_SIDE = 32


def _layout_root(config: DatasetConfig, folder: str):
    """(fs, root): the configured path, or its sub-folder `folder` when the path is the folder above it."""
    fs, root = folder_root(config)
    if posixpath.basename(root) != folder and folder in subfolders(fs, root):
        root = f"{root.rstrip('/')}/{folder}"
    return fs, root


# ---------------------------------------------------------------- WordNet names

def parse_wordnet_words(text: str) -> dict[str, str]:
    """`wnid<TAB>lemma, lemma, ...` lines (Tiny-ImageNet's words.txt, timm's lemma table) -> {wnid: lemmas}."""
    table = {}
    for line in text.splitlines():
        wnid, sep, lemmas = line.partition("\t")
        if sep and wnid.strip():
            table[wnid.strip()] = lemmas.strip()
    return table


def imagenet_lemmas() -> dict[str, str]:
    """WordNet id -> lemmas for every ImageNet-21k synset, from the table timm ships (no timm import:
    importing timm loads torch, and only its data file is needed)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("timm is needed for ImageNet WordNet-id class names (pip install timm)")
    path = Path(spec.origin).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: this timm version does not ship the ImageNet lemma table")
    return parse_wordnet_words(path.read_text(encoding="utf-8"))


def wordnet_class_names(wnids: Sequence[str], lemmas: dict[str, str], where: str) -> dict[str, str]:
    """wnid -> class name: its first lemma ("goldfish, Carassius auratus" -> "goldfish").

    Two classes whose first lemmas coincide (ImageNet has two "crane"s) are told apart by their wnid,
    "crane (n02012849)", rather than by a silent merge.
    """
    if unknown := sorted(w for w in wnids if w not in lemmas):
        raise ValueError(f"unknown wnid {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {where}: "
                         "class folders must be named by WordNet ids listed in the names table")
    first = {w: lemmas[w].split(",")[0].strip() or w for w in wnids}
    counts = Counter(first.values())
    raw = {w: f"{name} ({w})" if counts[name] > 1 else name for w, name in first.items()}
    normalised = normalised_names(list(raw.values()), where)
    return {w: normalised[name] for w, name in raw.items()}


def _renamed(by_class: dict[str, list], names: dict[str, str]) -> dict[str, list]:
    return {names[w]: files for w, files in by_class.items()}


# ---------------------------------------------------------------- ImageNet-R

def seeded_split(by_class: dict[str, list[tuple[str, int]]], test_fraction: float,
                 seed: int) -> tuple[dict, dict]:
    """An exact per-class split: round(n x test_fraction) of each class's files, drawn by a generator
    seeded with (seed, class), go to test. The same files always give the same split, and a class's
    split does not depend on which other classes are present."""
    train: dict[str, list[tuple[str, int]]] = {}
    test: dict[str, list[tuple[str, int]]] = {}
    for name, members in by_class.items():
        rng = np.random.default_rng([seed, int(sha1(name.encode("utf-8"))[:8], 16)])
        in_test = set(rng.permutation(len(members))[:round(len(members) * test_fraction)].tolist())
        for i, member in enumerate(sorted(members)):
            (test if i in in_test else train).setdefault(name, []).append(member)
    return train, test


def load_imagenet_r(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    """imagenet-r/<wnid>/<images> (200 wnids), split per class by `seeded_split`; or a copy already
    split into imagenet-r/train/<wnid>/... and imagenet-r/test/<wnid>/..., used as it is."""
    fs, root = _layout_root(config, IMAGENET_R_DIR)
    files = list_files(fs, root)
    split = presplit_class_files(fs, root, files, config.path)
    train, test = split or seeded_split(class_files(fs, root, "", files), config.test_fraction,
                                        config.split_seed)
    if not train and not test:
        raise ValueError(f"no images in {config.path}: expected the ImageNet-R layout "
                         f"{IMAGENET_R_DIR}/<wnid>/<images>, e.g. {IMAGENET_R_DIR}/n01443537/art_0.jpg")
    names = wordnet_class_names(sorted(set(train) | set(test)), imagenet_lemmas(), f"ImageNet-R at {config.path}")
    return file_splits(fs, root, _renamed(train, names), _renamed(test, names), config, classes,
                        f"ImageNet-R layout {config.path}")


# ---------------------------------------------------------------- Tiny-ImageNet

def load_tiny_imagenet(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    """tiny-imagenet-200/train/<wnid>/images/*.JPEG is the train split; val/images/*.JPEG, labelled by
    val/val_annotations.txt, is the test split (the official test/ has no labels); words.txt names them."""
    fs, root = _layout_root(config, TINY_IMAGENET_DIR)
    files = list_files(fs, root)
    where = f"Tiny-ImageNet at {config.path}"
    for needed in ("words.txt", "val/val_annotations.txt"):
        if needed not in files:
            raise FileNotFoundError(f"{needed} missing in {where}: expected {TINY_IMAGENET_DIR}/ with train/, "
                                    "val/images/, val/val_annotations.txt and words.txt")
    train = {wnid: [(rel, size) for rel, size in members if rel.split("/")[2] == "images"]
             for wnid, members in class_files(fs, root, "train", files).items()}
    train = {wnid: members for wnid, members in train.items() if members}
    if not train:
        raise ValueError(f"no training images in {where}: expected train/<wnid>/images/<images>")
    test: dict[str, list[tuple[str, int]]] = {}
    annotations = fs.cat_file(f"{root}/val/val_annotations.txt").decode("utf-8")
    for number, line in enumerate(annotations.splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2:
            raise ValueError(f"val/val_annotations.txt line {number} in {where}: expected "
                             f"<file>\\t<wnid>\\t..., got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in train:
            raise ValueError(f"val/val_annotations.txt line {number} in {where}: unknown wnid {wnid!r} "
                             "(no train/<wnid>/images folder)")
        relative = f"val/images/{name}"
        # a listed file that is absent is kept with size 0: reading it fails, and the row is counted
        test.setdefault(wnid, []).append((relative, files.get(relative, 0)))
    words = parse_wordnet_words(fs.cat_file(f"{root}/words.txt").decode("utf-8"))
    names = wordnet_class_names(sorted(train), words, f"words.txt of {where}")
    return file_splits(fs, root, _renamed(train, names), _renamed({w: sorted(m) for w, m in test.items()}, names),
                        config, classes, f"Tiny-ImageNet layout {config.path}")


# ---------------------------------------------------------------- CIFAR-100

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, strings and numpy arrays. Anything else a pickle could name
    (and run) is refused: the path is user-given and may be remote."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR pickle")


def _unpickle(fs, path: str) -> dict[str, object]:
    """A CIFAR pickle as a dict with str keys (Python 2 pickles load with latin1, as torchvision does)."""
    try:
        loaded = _ArrayUnpickler(io.BytesIO(fs.cat_file(path)), encoding="latin1").load()
    except Exception as exc:
        raise ValueError(f"{path} is not a CIFAR-100 python pickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a CIFAR-100 python pickle: holds a {type(loaded).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in loaded.items()}


def _field(batch: dict[str, object], key: str, path: str):
    if key not in batch:
        raise ValueError(f"{path} has no {key!r} entry (has {sorted(batch)}): not a CIFAR-100 python pickle")
    return batch[key]


def _cifar_rows(fs, path: str, names: list[str], wanted: set[str], per_class: int | None) -> LabelledImages:
    """The wanted classes' images of one CIFAR-100 split pickle, the first `per_class` of each in file order."""
    if not wanted:  # e.g. listing class names: the 150 MB train pickle need not be read
        return arrays_to_rows(np.zeros((0, CIFAR_SIDE, CIFAR_SIDE, 3), np.uint8), [], [])
    batch = _unpickle(fs, path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "fine_labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, {3 * CIFAR_SIDE * CIFAR_SIDE}), "
                         f"got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'fine_labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{path}: fine labels outside 0..{len(names) - 1} (meta names {len(names)} classes)")
    taken: Counter = Counter()
    picked = []
    for i, label in enumerate(labels.tolist()):
        name = names[label]
        if name in wanted and (per_class is None or taken[name] < per_class):
            taken[name] += 1
            picked.append(i)
    # rows are stored channel-first (1024 R, 1024 G, 1024 B); images are H x W x 3
    images = np.ascontiguousarray(data[picked].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1))
    return arrays_to_rows(images, [names[labels[i]] for i in picked], [sha1(image.tobytes()) for image in images])


def load_cifar100(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    """cifar-100-python/{train,test,meta}: the official 50,000 / 10,000 split, 100 fine classes named
    from meta's fine_label_names with underscores as spaces."""
    fs, root = _layout_root(config, CIFAR100_DIR)
    present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    for needed in ("meta", "train", "test"):
        if needed not in present:
            hint = " (this looks like CIFAR-10: batches.meta)" if "batches.meta" in present else ""
            raise FileNotFoundError(f"no {needed} file in {config.path}{hint}: expected the python version of "
                                    f"CIFAR-100, {CIFAR100_DIR}/ with the train, test and meta pickles")
    meta_path = f"{root}/meta"
    raw = [n.decode("latin1") if isinstance(n, bytes) else str(n)
           for n in _field(_unpickle(fs, meta_path), "fine_label_names", meta_path)]
    normalised = normalised_names([n.replace("_", " ") for n in raw], meta_path)
    names = [normalised[n.replace("_", " ")] for n in raw]
    wanted = wanted_classes(classes, sorted(names))
    return DatasetSplits(
        train=_cifar_rows(fs, f"{root}/train", names, wanted, config.train_per_class),
        test=_cifar_rows(fs, f"{root}/test", names, wanted, config.test_per_class),
        class_names=sorted(names), source=f"CIFAR-100 (python) at {config.path}", attribution=None)
