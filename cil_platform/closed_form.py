"""Closed-form exemplar-free baselines: ridge, RanPAC and shared-covariance LDA on the frozen features.

On frozen features a linear classifier solved in closed form is a strong exemplar-free competitor (SimpleCIL,
RanPAC, FeCAM); GMM has to be compared with it on the same features, split and class order. All three keep only
sufficient statistics of the pooled unit-norm features (`pooled_unit`), in float64: the Gram matrix G = sum x x^T,
the per-class sums (the columns of C = sum x y^T for one-hot y, one more per new class) and the per-class counts.
Adding a task adds its statistics, so after any task the classifier equals a batch fit on all seen data: no image
or feature vector is kept, and `memory_bytes` is the bytes of those statistics.

- ridge:  W = (G + lambda I)^-1 C, a solve; scores x W.
- ranpac: the same on h = ReLU(x P), P a fixed seeded Gaussian (D, M) projection (RanPAC, McDonnell et al. 2023);
          G is M x M (M = 2048 by default: 33.6 MB in float64, ~3 s a task on 2 CPU cores with 18 Cholesky solves;
          M = 4096 would be 134 MB and ~8x the time). P is regenerated from the seed, never stored or counted.
- lda:    class means and one shared covariance (FeCAM's "common" covariance, i.e. LDA) from the within-class
          scatter G - sum_k n_k mu_k mu_k^T, shrunk towards (trace / D) I; scores x S^-1 mu_k - mu_k S^-1 mu_k / 2.
          Shrinkage 1 is Euclidean nearest mean.
The hyperparameter (ridge's lambda, LDA's shrinkage) is chosen per task as RanPAC does, on the current task's
training data only: the classifier is fitted on the old statistics plus ~80 % of each new class's images, scored
on the other ~20 % (ridge: mean squared error to the one-hot targets, RanPAC's criterion; LDA: cross-entropy of
its posteriors), the best value of a log grid is kept, and the classifier is refitted on all of the task. Which
images are held out depends on their content keys and the seed only, so a resumed run holds out the same ones.
jobs/arena.py runs them beside the other baselines on the demo's scenario without training GMM (seeds 0-2: last
accuracy ridge 45.7 %, ranpac 45.1 %, lda 46.3 % against ncm 38.6 % and joint 44.9 %).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureSet, FeatureTable

RIDGE_GRID = tuple(float(10.0 ** p) for p in range(-8, 9))  # RanPAC's lambda grid
SHRINKAGE_GRID = tuple(float(g) for g in np.logspace(-4, 0, 9))
HOLDOUT = 0.2


def holdout_mask(labels: np.ndarray, keys: np.ndarray, seed: int, fraction: float = HOLDOUT) -> np.ndarray:
    """Which training rows score the hyperparameters: per class, round(fraction * n) rows (at least one, never all),
    ranked by a seeded hash of their content key, so the choice does not depend on row order."""
    mask = np.zeros(len(labels), dtype=bool)
    for name in dict.fromkeys(labels):
        rows = np.flatnonzero(labels == name)
        if len(rows) < 2:
            continue
        ranked = sorted(rows, key=lambda i: hashlib.sha1(f"holdout:{seed}:{keys[i]}".encode()).hexdigest())
        mask[ranked[: min(max(1, round(fraction * len(rows))), len(rows) - 1)]] = True
    return mask


class SufficientStatistics:
    """G = sum x x^T (D, D), per-class sums (K, D) and counts (K,) of float64 vectors; classes in learning order."""

    def __init__(self, classes: list[str], gram: np.ndarray, sums: np.ndarray, counts: np.ndarray):
        self.classes, self.gram, self.sums, self.counts = list(classes), gram, sums, counts

    @classmethod
    def of(cls, x: torch.Tensor, labels: np.ndarray) -> "SufficientStatistics":
        x = x.double()
        classes = [str(c) for c in dict.fromkeys(labels)]
        one_hot = torch.from_numpy(np.stack([labels == c for c in classes], axis=1).astype(np.float64))
        return cls(classes, (x.T @ x).numpy(), (one_hot.T @ x).numpy(), one_hot.sum(0).numpy().astype(np.int64))

    def plus(self, other: "SufficientStatistics") -> "SufficientStatistics":
        """The statistics of both sets of rows: this one's classes first, then the other's new ones."""
        classes = self.classes + [c for c in other.classes if c not in self.classes]
        sums = np.zeros((len(classes), self.sums.shape[1]))
        counts = np.zeros(len(classes), dtype=np.int64)
        sums[: len(self.classes)], counts[: len(self.classes)] = self.sums, self.counts
        rows = [classes.index(c) for c in other.classes]
        sums[rows] += other.sums
        counts[rows] += other.counts
        return SufficientStatistics(classes, self.gram + other.gram, sums, counts)

    def targets(self, labels: np.ndarray) -> torch.Tensor:
        """Column index of each label."""
        return torch.tensor([self.classes.index(str(c)) for c in labels])

    @property
    def nbytes(self) -> int:
        return self.gram.nbytes + self.sums.nbytes + self.counts.nbytes

    def state_dict(self) -> dict:
        return {"classes": list(self.classes), "gram": self.gram, "sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict) -> "SufficientStatistics":  # writable copies of the loaded arrays
        return cls(state["classes"], np.array(state["gram"], dtype=np.float64),
                   np.array(state["sums"], dtype=np.float64), np.array(state["counts"], dtype=np.int64))


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for a symmetric positive definite: Cholesky, or LU where rounding made `a` indefinite."""
    factor, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, factor) if int(info) == 0 else torch.linalg.solve(a, b)


class ClosedForm:
    """Learns by adding a task's statistics, choosing the hyperparameter on a held-out part of the task and
    solving once; subclasses say how features are embedded, how a linear classifier is solved from the
    statistics, and how a held-out prediction is scored."""

    name = ""
    grid: tuple[float, ...] = ()

    def __init__(self, seed: int = 0, grid: tuple[float, ...] | None = None):
        self.seed = seed
        self.grid = tuple(grid) if grid is not None else self.grid
        self.stats: SufficientStatistics | None = None
        self.chosen: list[float] = []  # the hyperparameter of every task so far
        self.weight, self.bias = torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)

    def embed(self, table: FeatureTable) -> torch.Tensor:
        return table.pooled.double()

    def solve(self, stats: SufficientStatistics, param: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (D, K), bias (K,)) of the classifier of `stats` with hyperparameter `param`."""
        raise NotImplementedError

    def solve_grid(self, stats: SufficientStatistics) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`solve(stats, p)` for every p of the grid, in grid order (what `choose` compares)."""
        return (self.solve(stats, param) for param in self.grid)

    def loss(self, scores: torch.Tensor, targets: torch.Tensor) -> float:
        """Held-out loss of scores (N, K) for true columns `targets` (lower is better)."""
        raise NotImplementedError

    def choose(self, x: torch.Tensor, labels: np.ndarray, keys: np.ndarray) -> float:
        """The grid value whose fit on the old statistics plus the kept rows scores best on the held-out rows
        (the first on ties); the last choice (or the grid's middle) when no class has two images."""
        held = holdout_mask(labels, keys, self.seed)
        if len(self.grid) == 1:
            return self.grid[0]
        if not held.any():
            return self.chosen[-1] if self.chosen else self.grid[len(self.grid) // 2]
        fit = self.without(x, labels, held)
        x_held, targets = x[torch.from_numpy(held)], fit.targets(labels[held])
        losses = [self.loss(x_held @ w + b, targets) for w, b in self.solve_grid(fit)]
        return self.grid[int(np.argmin(losses))]

    def without(self, x: torch.Tensor, labels: np.ndarray, held: np.ndarray) -> SufficientStatistics:
        """The statistics learned so far plus a task's rows that are not `held` (the held-out fit)."""
        kept = SufficientStatistics.of(x[torch.from_numpy(~held)], labels[~held])
        return kept if self.stats is None else self.stats.plus(kept)

    def learn(self, train: FeatureSet | FeatureTable, seen: list[str]) -> None:
        self.learn_embedded(self.embed(train), np.asarray([str(c) for c in train.labels], dtype=object),
                            np.asarray(train.keys))

    def learn_embedded(self, x: torch.Tensor, labels: np.ndarray, keys: np.ndarray) -> None:
        """`learn` from a task's embedded rows (the ridge fusion embeds a task once for this and its validation)."""
        self.chosen.append(self.choose(x, labels, keys))
        new = SufficientStatistics.of(x, labels)
        self.stats = new if self.stats is None else self.stats.plus(new)
        self.weight, self.bias = self.solve(self.stats, self.chosen[-1])

    def predict(self, test: FeatureTable, seen: list[str]) -> list[str]:
        columns = torch.tensor([self.stats.classes.index(c) for c in seen])
        scores = self.embed(test) @ self.weight[:, columns] + self.bias[columns]
        return [seen[i] for i in scores.argmax(1).tolist()]

    @property
    def memory_bytes(self) -> int:
        return self.stats.nbytes if self.stats else 0

    def state_dict(self) -> dict:
        return {"chosen": list(self.chosen), "stats": self.stats.state_dict() if self.stats else None}

    def load_state_dict(self, state: dict) -> None:
        """The statistics and choices; the classifier is solved again from them, as `learn` solved it."""
        self.chosen = [float(p) for p in state["chosen"]]
        self.stats = SufficientStatistics.from_state(state["stats"]) if state["stats"] else None
        if self.stats:
            self.weight, self.bias = self.solve(self.stats, self.chosen[-1])


class Ridge(ClosedForm):
    """Ridge regression on one-hot targets: W = (G + lambda I)^-1 C, no bias (as RanPAC)."""

    name = "ridge"
    grid = RIDGE_GRID

    def solve(self, stats, param):
        gram = torch.from_numpy(stats.gram).clone()
        gram.diagonal().add_(param)  # G + lambda I, without a D x D identity
        weight = solve_spd(gram, torch.from_numpy(stats.sums).T)
        return weight, torch.zeros(weight.shape[1], dtype=weight.dtype)

    def solve_grid(self, stats):
        """Every lambda from one eigendecomposition G = V diag(e) V^T: W = V diag(1 / (e + lambda)) V^T C. At
        RanPAC's M = 2048 its 17 values took 1.4 s against 2.7 s for 17 Cholesky solves (2 threads); both solvers
        are backward stable, so they agree up to the system's conditioning (tests/test_platform_closed_form.py)."""
        values, vectors = torch.linalg.eigh(torch.from_numpy(stats.gram))
        rotated = vectors.T @ torch.from_numpy(stats.sums).T
        for param in self.grid:
            weight = vectors @ (rotated / (values + param)[:, None])
            yield weight, torch.zeros(weight.shape[1], dtype=weight.dtype)

    def loss(self, scores, targets):
        return float(F.mse_loss(scores, F.one_hot(targets, scores.shape[1]).double()))


class RanPAC(Ridge):
    """Ridge on ReLU(x P): the random expansion makes class boundaries more linear (RanPAC)."""

    name = "ranpac"

    def __init__(self, seed: int = 0, grid: tuple[float, ...] | None = None, dim: int = 2048):
        super().__init__(seed, grid)
        self.dim = dim
        self.projection: torch.Tensor | None = None  # (D, M), made on first use: D is the features' width

    def embed(self, table):
        x = super().embed(table)
        if self.projection is None or self.projection.shape[0] != x.shape[1]:
            generator = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(x.shape[1], self.dim, generator=generator, dtype=torch.float64)
        return torch.relu(x @ self.projection)


class SharedCovariance(ClosedForm):
    """LDA: Gaussian classes with one shared, shrunk covariance; equal class priors."""

    name = "lda"
    grid = SHRINKAGE_GRID

    def solve(self, stats, param):
        sums, counts = torch.from_numpy(stats.sums), torch.from_numpy(stats.counts).double()
        means = sums / counts[:, None]
        scatter = torch.from_numpy(stats.gram) - means.T @ sums
        cov = (scatter + scatter.T) / 2 / max(float(counts.sum()) - len(counts), 1.0)
        scale = float(torch.trace(cov)) / len(cov) or 1.0
        shrunk = (1 - param) * cov + param * scale * torch.eye(len(cov), dtype=cov.dtype)
        weight = solve_spd(shrunk, means.T)
        return weight, -0.5 * (means.T * weight).sum(0)

    def loss(self, scores, targets):
        return float(F.cross_entropy(scores, targets))


CLOSED_FORM = {"ridge": Ridge, "ranpac": RanPAC, "lda": SharedCovariance}
