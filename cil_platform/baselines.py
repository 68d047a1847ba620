"""Discriminative baselines on the same frozen features, split and class order as GMM.

- ncm: SimpleCIL — nearest class mean (cosine) of the frozen features; no training, no forgetting
  of prototypes. The prototypes are the run's class statistics (class_stats.py), shared with the fusion.
- linear_sequential: a linear head trained on each task's data only (shows forgetting).
- joint: a linear head retrained on all seen classes' data at every task (the upper bound).
- ridge, ranpac, lda: closed-form classifiers kept as sufficient statistics, exemplar-free (closed_form.py).
Features are the encoder tokens averaged into one vector (the encoder's global embedding).
`state_dict` / `load_state_dict` (numpy arrays and JSON values) let a resumed run continue where it stopped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .class_stats import ClassStatistics, pooled_unit
from .closed_form import CLOSED_FORM
from .features import FeatureTable


def embed(table: FeatureTable) -> torch.Tensor:
    return pooled_unit(table.features)


class NearestClassMean:
    """Reads the prototypes of the class statistics, which the experiment learns every task; holds nothing itself."""

    name = "ncm"

    def __init__(self, stats: ClassStatistics):
        self.stats = stats

    def learn(self, train: FeatureTable, seen: list[str]) -> None:
        pass

    def predict(self, test: FeatureTable, seen: list[str]) -> list[str]:
        scores = embed(test) @ torch.from_numpy(self.stats.matrix("prototype", seen)).T
        return [seen[i] for i in scores.argmax(1).tolist()]

    @property
    def memory_bytes(self) -> int:
        return self.stats.nbytes(["prototype"])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LinearHead:
    """Softmax head over unit-norm features (logits scaled by 10); `joint` retrains from scratch on all seen data."""

    def __init__(self, joint: bool, seed: int = 0, epochs: int = 30, lr: float = 1e-2):
        self.name = "joint" if joint else "linear_sequential"
        self.joint, self.epochs, self.lr = joint, epochs, lr
        self.generator = torch.Generator().manual_seed(seed)
        self.weight = torch.zeros(0, 0)
        self.bias = torch.zeros(0)
        self.seen_data: list[FeatureTable] = []

    def learn(self, train: FeatureTable, seen: list[str]) -> None:
        if self.joint:
            self.seen_data.append(train)
            data = FeatureTable(np.concatenate([t.features for t in self.seen_data]),
                                np.concatenate([t.labels for t in self.seen_data]),
                                np.concatenate([t.keys for t in self.seen_data]))
        else:
            data = train
        x, y = embed(data), torch.tensor([seen.index(str(c)) for c in data.labels])
        dim = x.shape[1]
        weight = torch.zeros(len(seen), dim)
        bias = torch.zeros(len(seen))
        if not self.joint and self.weight.numel():  # keep the old rows, continue from them
            weight[: len(self.weight)], bias[: len(self.bias)] = self.weight, self.bias
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        optimizer = torch.optim.AdamW([weight, bias], lr=self.lr, weight_decay=1e-4)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=self.generator).split(64):
                loss = F.cross_entropy(x[idx] @ weight.T * 10 + bias, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.weight, self.bias = weight.detach(), bias.detach()

    def predict(self, test: FeatureTable, seen: list[str]) -> list[str]:
        scores = embed(test) @ self.weight.T * 10 + self.bias
        return [seen[i] for i in scores.argmax(1).tolist()]

    @property
    def memory_bytes(self) -> int:
        return sum(t.features.nbytes for t in self.seen_data)

    def state_dict(self) -> dict:  # with the generator's state: later tasks shuffle as if never stopped
        return {"weight": self.weight.numpy(), "bias": self.bias.numpy(),
                "generator": self.generator.get_state().numpy(),
                "seen_data": [{"features": t.features, "labels": t.labels.tolist(), "keys": t.keys.tolist()}
                              for t in self.seen_data]}

    def load_state_dict(self, state: dict) -> None:
        self.weight, self.bias = torch.from_numpy(np.array(state["weight"])), torch.from_numpy(np.array(state["bias"]))
        self.generator.set_state(torch.from_numpy(np.array(state["generator"])))
        self.seen_data = [FeatureTable(t["features"], np.asarray(t["labels"], dtype=object),
                                       np.asarray(t["keys"], dtype=object)) for t in state["seen_data"]]


def make_baseline(name: str, stats: ClassStatistics, seed: int = 0):
    if name == "ncm":
        return NearestClassMean(stats)
    if name in ("linear_sequential", "joint"):
        return LinearHead(joint=name == "joint", seed=seed)
    if name in CLOSED_FORM:
        return CLOSED_FORM[name](seed=seed)
    raise ValueError(f"unknown baseline {name!r}; use ncm, linear_sequential, joint, {', '.join(CLOSED_FORM)}")
