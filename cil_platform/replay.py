"""Forgetting control: what a task's training may replay of the classes it no longer has images of.

- none: the paper's exemplar-free form; only the new task's images.
- pseudo: per-class, per-token Gaussian statistics (mean, std) of the cached features; replayed
  samples are drawn from them. No image or feature of an old class is kept. The statistics are the run's
  one ClassStatistics component (class_stats.py), which the prior and the prototypes share.
  With `covariance="shared"`, the per-class means with one within-class covariance per token position, shared
  by all classes (the statistic ridge and LDA rest on), instead of the per-class diagonal.
- exemplar: a fixed total budget of real cached feature sets, chosen per class by herding
  (iCaRL) or at random, shrunk evenly as classes arrive.
A memory hands the training workers a `payload` (plain numpy arrays) and `sample_replay` draws from it.
`nbytes` is what the memory itself holds; `stats_parts` the class statistics it reads (counted by their owner).
`state_dict` / `load_state_dict` (numpy arrays and JSON values) let a resumed run continue with the same memory.
"""
from __future__ import annotations

import numpy as np

from .class_stats import ClassStatistics, Part
from .features import FeatureTable


def pooled(features: np.ndarray) -> np.ndarray:
    """(N, T, D) tokens -> (N, T*D) float32 vectors; what the baselines and herding compare."""
    return features.reshape(len(features), -1).astype(np.float32)


class NoReplay:
    mode = "none"
    stats_parts: tuple[Part, ...] = ()

    def update(self, task: FeatureTable) -> None:
        pass

    def payload(self) -> dict | None:
        return None

    @property
    def nbytes(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PseudoFeatureReplay(NoReplay):
    """Draws from the Gaussians of the class statistics; holds nothing itself (the experiment learns the statistics)."""

    mode = "pseudo"
    stats_parts: tuple[Part, ...] = ("mean", "std")

    def __init__(self, stats: ClassStatistics) -> None:
        self.stats = stats

    def payload(self) -> dict | None:
        if not self.stats.classes:
            return None
        return {"mode": "pseudo", "classes": list(self.stats.classes),
                "mean": self.stats.matrix("mean", self.stats.classes), "std": self.stats.matrix("std", self.stats.classes)}


class SharedCovarianceReplay(PseudoFeatureReplay):
    """Draws mean_c + L_t z per token t: the class means of the class statistics, and a within-class covariance per
    token position pooled over every class learned so far (its float64 scatter and degrees of freedom are what this
    memory holds), shrunk by SHRINKAGE towards its own diagonal (it is singular while there are fewer within-class
    degrees of freedom than feature dimensions)."""

    mode = "pseudo"
    stats_parts: tuple[Part, ...] = ("mean",)
    SHRINKAGE = 0.1

    def __init__(self, stats: ClassStatistics) -> None:
        super().__init__(stats)
        self.scatter: np.ndarray | None = None  # (T, D, D) sum over classes of the centred tokens' outer products
        self.dof = 0  # rows minus classes

    def update(self, task: FeatureTable) -> None:
        for _, features in task.by_class():
            centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
            scatter = np.einsum("ntd,nte->tde", centred, centred)
            self.scatter = scatter if self.scatter is None else self.scatter + scatter
            self.dof += len(features) - 1

    def factor(self) -> np.ndarray:
        """(T, D, D) float32 L_t with L_t L_t^T the shrunk covariance of token t (eigenvalues clipped at 0)."""
        cov = self.scatter / max(self.dof, 1)
        diagonal = np.einsum("tdd->td", cov)
        shrunk = (1 - self.SHRINKAGE) * cov
        shrunk[:, np.arange(cov.shape[1]), np.arange(cov.shape[1])] += self.SHRINKAGE * diagonal
        values, vectors = np.linalg.eigh(shrunk)
        return (vectors * np.sqrt(np.clip(values, 0, None))[:, None, :]).astype(np.float32)

    def payload(self) -> dict | None:
        if not self.stats.classes or self.scatter is None:
            return None
        return {"mode": "pseudo-shared", "classes": list(self.stats.classes),
                "mean": self.stats.matrix("mean", self.stats.classes), "factor": self.factor()}

    @property
    def nbytes(self) -> int:
        return self.scatter.nbytes if self.scatter is not None else 0

    def state_dict(self) -> dict:
        return {"scatter": self.scatter if self.scatter is not None else np.zeros(0), "dof": self.dof}

    def load_state_dict(self, state: dict) -> None:
        self.scatter = np.array(state["scatter"], dtype=np.float64) if np.size(state["scatter"]) else None
        self.dof = int(state["dof"])


class ExemplarMemory:
    mode = "exemplar"
    stats_parts: tuple[Part, ...] = ()

    def __init__(self, budget: int, selection: str = "herding", seed: int = 0):
        self.budget, self.selection = budget, selection
        self.rng = np.random.default_rng(seed)
        self.per_class: dict[str, np.ndarray] = {}  # class -> (m, T, D) float16, in selection order

    def update(self, task: FeatureTable) -> None:
        names = [str(n) for n in dict.fromkeys(task.labels)]
        classes = len(set(self.per_class) | set(names))
        quota = self.budget // classes
        if quota < 1:
            raise ValueError(f"exemplar budget {self.budget} cannot hold one feature set for each of {classes} classes")
        for name, feats in task.by_class():  # one class's rows at a time (streamed from the cache for a FeatureSet)
            feats = feats.astype(np.float16)
            self.per_class[name] = feats[self._order(feats)[:quota]]
        for name in self.per_class:  # the order is best-first, so shrinking keeps the best
            self.per_class[name] = self.per_class[name][:quota]

    def _order(self, feats: np.ndarray) -> np.ndarray:
        if self.selection == "random":
            return self.rng.permutation(len(feats))
        return herding_order(pooled(feats))

    def payload(self) -> dict | None:
        if not self.per_class:
            return None
        return {"mode": "exemplar",
                "features": np.concatenate(list(self.per_class.values())),
                "labels": [n for n, f in self.per_class.items() for _ in range(len(f))]}

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.per_class.values())

    def state_dict(self) -> dict:  # with the generator's state: random selection continues as if never stopped
        return {"classes": list(self.per_class), "features": list(self.per_class.values()),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = dict(zip(state["classes"], state["features"]))
        self.rng.bit_generator.state = state["rng"]


def herding_order(vectors: np.ndarray) -> np.ndarray:
    """iCaRL herding: greedily pick samples whose running mean stays closest to the class mean."""
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)
    target, total, chosen = x.mean(0), np.zeros(x.shape[1]), []
    available = np.ones(len(x), dtype=bool)
    for k in range(1, len(x) + 1):
        distance = np.linalg.norm(target - (total + x) / k, axis=1)
        distance[~available] = np.inf
        best = int(distance.argmin())
        chosen.append(best)
        available[best] = False
        total += x[best]
    return np.asarray(chosen)


def make_memory(mode: str, stats: ClassStatistics, budget: int = 2000, selection: str = "herding", seed: int = 0,
                covariance: str = "diagonal"):
    if mode == "none":
        return NoReplay()
    if mode == "pseudo":
        if covariance not in ("diagonal", "shared"):
            raise ValueError(f"unknown pseudo-feature covariance {covariance!r}; use diagonal or shared")
        return SharedCovarianceReplay(stats) if covariance == "shared" else PseudoFeatureReplay(stats)
    if mode == "exemplar":
        return ExemplarMemory(budget, selection, seed)
    raise ValueError(f"unknown replay mode {mode!r}; use none, pseudo or exemplar")


def sample_replay(payload: dict | None, count: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Draw `count` replayed (features (count, T, D) float32, labels); classes uniformly for pseudo."""
    if payload is None or count <= 0:
        return np.zeros((0,), np.float32), []
    if payload["mode"] == "pseudo":
        classes = rng.integers(len(payload["classes"]), size=count)
        noise = rng.standard_normal((count, *payload["mean"].shape[1:]), dtype=np.float32)
        feats = payload["mean"][classes] + payload["std"][classes] * noise
        return feats.astype(np.float32), [payload["classes"][c] for c in classes]
    if payload["mode"] == "pseudo-shared":
        classes = rng.integers(len(payload["classes"]), size=count)
        noise = rng.standard_normal((count, *payload["mean"].shape[1:]), dtype=np.float32)
        feats = payload["mean"][classes] + np.einsum("ntd,ted->nte", noise, payload["factor"])
        return feats.astype(np.float32), [payload["classes"][c] for c in classes]
    rows = rng.integers(len(payload["labels"]), size=count)
    return payload["features"][rows].astype(np.float32), [payload["labels"][r] for r in rows]
