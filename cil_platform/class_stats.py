"""Class statistics: what the platform keeps of a class once its images are gone (no exemplar).

Per seen class: the mean and standard deviation of every visual token (T, D), and the prototype (D,): the unit-norm
mean of the class's unit-norm mean-pooled features, as nearest-class-mean (SimpleCIL) uses it. One component serves
pseudo-feature replay (the Gaussians), the first-token prior (the means), the prototype fusion and the NCM baseline
(the prototypes): learned once per task, persisted once with the run state, and counted once in memory figures.
They are sufficient statistics: `learn` accumulates per-class sums over a stream of batches (a FeatureSet streams
them from the feature cache), so the driver holds one batch and O(classes) sums, never a class's features.
"""
from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureSet, FeatureTable, pooled_unit

Part = Literal["mean", "std", "prototype"]


class ClassStatistics:
    def __init__(self) -> None:
        self.classes: list[str] = []  # in the order they were learned: replay draws classes by index
        self.mean: dict[str, np.ndarray] = {}
        self.std: dict[str, np.ndarray] = {}
        self.prototype: dict[str, np.ndarray] = {}

    def learn(self, train: FeatureSet | FeatureTable, batch_size: int = 256) -> None:
        """Add (or replace) the statistics of every class with rows in `train` (classes in order of first appearance),
        from float64 sums of x, x^2 and the pooled unit vectors over its batches."""
        sums: dict[str, list] = {str(name): [0, 0.0, 0.0, 0.0] for name in dict.fromkeys(train.labels)}
        for batch in train.batches(batch_size):
            pooled = pooled_unit(batch.features).double().numpy()
            for name in dict.fromkeys(batch.labels):
                mask = batch.labels == name
                x, total = batch.features[mask].astype(np.float64), sums[str(name)]
                total[0] += len(x)
                total[1] = total[1] + x.sum(0)
                total[2] = total[2] + (x * x).sum(0)
                total[3] = total[3] + pooled[mask].sum(0)
        for name, (count, linear, square, pooled) in sums.items():
            if name not in self.mean:
                self.classes.append(name)
            mean = linear / count
            self.mean[name] = mean.astype(np.float32)
            self.std[name] = np.sqrt(np.maximum(square / count - mean * mean, 0.0)).astype(np.float32)
            self.prototype[name] = F.normalize(torch.from_numpy(pooled / count).float(), dim=0).numpy()

    def matrix(self, part: Part, classes: Iterable[str]) -> np.ndarray:
        """(C, ...) stacked statistics of `classes`, in that order."""
        table = getattr(self, part)
        missing = [c for c in classes if c not in table]
        if missing:
            raise KeyError(f"no class statistics for {missing[:5]}")
        return np.stack([table[c] for c in classes])

    def nbytes(self, parts: Iterable[Part]) -> int:
        """Bytes of the parts a method uses: each part counted once however many uses share it."""
        return sum(a.nbytes for part in set(parts) for a in getattr(self, part).values())

    def state_dict(self) -> dict:
        return {"classes": list(self.classes), "mean": [self.mean[c] for c in self.classes],
                "std": [self.std[c] for c in self.classes], "prototype": [self.prototype[c] for c in self.classes]}

    def load_state_dict(self, state: dict) -> None:
        self.classes = list(state["classes"])
        for part in ("mean", "std", "prototype"):
            setattr(self, part, {c: np.array(a) for c, a in zip(self.classes, state[part])})  # writable copies
