"""Class statistics: what the platform keeps of a class once its images are gone (no exemplar).

Per seen class: the mean and standard deviation of every visual token (T, D), and the prototype (D,): the unit-norm
mean of the class's unit-norm mean-pooled features, as nearest-class-mean (SimpleCIL) uses it. One component serves
pseudo-feature replay (the Gaussians), the first-token prior (the means), the prototype fusion and the NCM baseline
(the prototypes): learned once per task, persisted once with the run state, and counted once in memory figures.
"""
from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureTable

Part = Literal["mean", "std", "prototype"]


def pooled_unit(features: np.ndarray) -> torch.Tensor:
    """(N, T, D) tokens -> (N, D) unit-norm mean-pooled vectors (the encoder's global embedding)."""
    return F.normalize(torch.from_numpy(features.astype(np.float32)).mean(1), dim=1)


class ClassStatistics:
    def __init__(self) -> None:
        self.classes: list[str] = []  # in the order they were learned: replay draws classes by index
        self.mean: dict[str, np.ndarray] = {}
        self.std: dict[str, np.ndarray] = {}
        self.prototype: dict[str, np.ndarray] = {}

    def learn(self, train: FeatureTable) -> None:
        """Add (or replace) the statistics of every class with rows in `train`."""
        for name, features in train.by_class():
            if name not in self.mean:
                self.classes.append(name)
            self.mean[name], self.std[name] = features.mean(0), features.std(0)
            self.prototype[name] = F.normalize(pooled_unit(features).mean(0), dim=0).numpy()

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
