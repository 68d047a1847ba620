"""Discriminative baselines on the same frozen features, split and class order as GMM.

- ncm: SimpleCIL — nearest class mean (cosine) of the frozen features; no training, no forgetting
  of prototypes. The prototypes are the run's class statistics (class_stats.py), shared with the fusion.
- linear_sequential: a linear head trained on each task's data only (shows forgetting).
- joint: a linear head retrained on all seen classes' data at every task (the upper bound).
- ridge, ranpac, lda: closed-form classifiers kept as sufficient statistics, exemplar-free (closed_form.py). With
  the ridge fusion on (fusion.py), ridge is the fusion's own ridge, learned before evaluation (`LearnedRidge`).
Features are the encoder tokens averaged into one vector (the encoder's global embedding), computed batch by batch
from the rows (a FeatureSet streams them from the feature cache); predictions are made batch by batch too.
The heads train in memory on the pooled vectors of their data, read in one pass per task: linear_sequential holds
one task's, joint every seen image's (it is the upper bound that keeps all data; docs/data_plane.md).
`state_dict` / `load_state_dict` (numpy arrays and JSON values) let a resumed run continue where it stopped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .class_stats import ClassStatistics
from .closed_form import CLOSED_FORM, Ridge
from .features import FeatureSet, FeatureTable, key_bytes


def argmax_classes(test: FeatureSet | FeatureTable, seen: list[str], scores, chunk: int = 4096) -> list[str]:
    """The best-scoring seen class of each test row (in row order), `scores(pooled unit vectors)` a chunk of rows
    at a time (the scores of every row and class at once would be rows x classes floats)."""
    x = test.pooled
    best = [scores(x[start:start + chunk]).argmax(1) for start in range(0, len(x), chunk)]
    return [seen[i] for i in torch.cat(best).tolist()] if best else []


class NearestClassMean:
    """Reads the prototypes of the class statistics, which the experiment learns every task; holds nothing itself."""

    name = "ncm"

    def __init__(self, stats: ClassStatistics):
        self.stats = stats

    def learn(self, train: FeatureTable, seen: list[str]) -> None:
        pass

    def predict(self, test: FeatureSet | FeatureTable, seen: list[str]) -> list[str]:
        prototypes = torch.from_numpy(self.stats.matrix("prototype", seen)).T
        return argmax_classes(test, seen, lambda x: x @ prototypes)

    @property
    def memory_bytes(self) -> int:
        return self.stats.nbytes(["prototype"])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LearnedRidge:
    """The ridge baseline when the ridge fusion runs: reads the fusion's ridge, which the experiment learns every task
    before evaluation (the same code, seed and lambda choice as the baseline's own); holds nothing itself."""

    name = "ridge"

    def __init__(self, ridge: Ridge):
        self.ridge = ridge

    def learn(self, train: FeatureTable, seen: list[str]) -> None:
        pass

    def predict(self, test: FeatureSet | FeatureTable, seen: list[str]) -> list[str]:
        return self.ridge.predict(test, seen)

    @property
    def memory_bytes(self) -> int:
        return self.ridge.memory_bytes

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LinearHead:
    """Softmax head over unit-norm features (logits scaled by 10); `joint` retrains from scratch on all seen data.
    `pool` (the experiment's training set) is where a resumed joint head finds the streamed sets it saw by key."""

    def __init__(self, joint: bool, seed: int = 0, epochs: int = 30, lr: float = 1e-2, pool: FeatureSet | None = None):
        self.name = "joint" if joint else "linear_sequential"
        self.joint, self.epochs, self.lr = joint, epochs, lr
        self.generator = torch.Generator().manual_seed(seed)
        self.weight = torch.zeros(0, 0)
        self.bias = torch.zeros(0)
        self.pool = pool
        self.seen_data: list[FeatureSet | FeatureTable] = []
        self.embedded: list[torch.Tensor] = []  # pooled vectors of seen_data read so far (joint reads each set once)

    def learn(self, train: FeatureSet | FeatureTable, seen: list[str]) -> None:
        if self.joint:
            self.seen_data.append(train)
        data = self.seen_data if self.joint else [train]
        column = {name: i for i, name in enumerate(seen)}
        if self.joint:
            self.embedded += [t.pooled for t in self.seen_data[len(self.embedded):]]
        x = torch.cat(self.embedded if self.joint else [train.pooled])
        y = torch.tensor([column[str(c)] for t in data for c in t.labels])
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

    def predict(self, test: FeatureSet | FeatureTable, seen: list[str]) -> list[str]:
        return argmax_classes(test, seen, lambda x: x @ self.weight.T * 10 + self.bias)

    @property
    def memory_bytes(self) -> int:
        return sum(t.nbytes for t in self.seen_data)

    def state_dict(self) -> dict:  # with the generator's state: later tasks shuffle as if never stopped
        return {"weight": self.weight.numpy(), "bias": self.bias.numpy(),
                "generator": self.generator.get_state().numpy(),
                "seen_data": [{"labels": t.labels.tolist(), "keys": t.keys.tolist(),
                               **({"features": t.features} if isinstance(t, FeatureTable) else {})}
                              for t in self.seen_data]}  # a streamed set: its keys, found again in the pool

    def load_state_dict(self, state: dict) -> None:
        self.weight, self.bias = torch.from_numpy(np.array(state["weight"])), torch.from_numpy(np.array(state["bias"]))
        self.generator.set_state(torch.from_numpy(np.array(state["generator"])))
        self.embedded = []
        self.seen_data = [FeatureTable(t["features"], np.asarray(t["labels"], dtype=object),
                                       np.asarray(t["keys"], dtype=object))
                          if "features" in t else self._in_pool(t["keys"]) for t in state["seen_data"]]

    def _in_pool(self, keys: list[str]) -> FeatureSet:
        if self.pool is None:
            raise ValueError(f"{self.name}: a saved streamed set needs the experiment's training set to be found in")
        wanted, mine = key_bytes(keys), self.pool.key_bytes
        width = mine.shape[1]
        return self.pool.subset(np.isin(mine.view(f"S{width}").ravel(), wanted.view(f"S{width}").ravel()))


def make_baseline(name: str, stats: ClassStatistics, seed: int = 0, pool: FeatureSet | None = None,
                  ridge: Ridge | None = None):
    """`ridge`: the ridge fusion's ridge, which the `ridge` baseline then reads instead of learning its own."""
    if name == "ncm":
        return NearestClassMean(stats)
    if name == "ridge" and ridge is not None:
        return LearnedRidge(ridge)
    if name in ("linear_sequential", "joint"):
        return LinearHead(joint=name == "joint", seed=seed, pool=pool)
    if name in CLOSED_FORM:
        return CLOSED_FORM[name](seed=seed)
    raise ValueError(f"unknown baseline {name!r}; use ncm, linear_sequential, joint, {', '.join(CLOSED_FORM)}")
