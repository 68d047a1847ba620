"""Fusion of GMM's generative score with the ridge head (the `trie+prior+ridge` rule), chosen on held-out training data.

The fused logit of class c is `a * ridge_c(x) + b * g_c(x)`, g being GMM's prior-corrected first-token log-probability
(gmm_model/classify.py). a is the ridge scores' inverse temperature, b / a the generative score's weight; both are
chosen per task, by cross-entropy on a validation set that no test image enters (`RidgeFusion.learn_and_validate`):
- the current task's held-out training rows (closed_form.holdout_mask: the ~20 % that ridge's own lambda is chosen
  on), scored by the ridge fitted without them and by a projection that did not train on them: with the ridge rule
  on, each task's projection trains on the other ~80 % (`RidgeFusion.held_out`). Scored on rows it had trained on
  (once), the projection looked far better than on test and the choice overweighted it (docs/results.md, session 6);
- for every old class, whose images are gone, `pseudo_per_class` pseudo-features drawn from its class statistics
  (the Gaussians pseudo replay draws from), so the choice also sees the old classes a new task's bias hurts. The
  projection trained on draws of the same Gaussians: on these rows the generative side is still optimistic.
The ridge is closed_form.Ridge, the ridge baseline's own code and lambda choice; with the ridge baseline on, it is
the baseline (baselines.LearnedRidge reads it), so one set of statistics serves both. Like the closed forms, it
reads a task's pooled vectors once (one streamed pass); the held-out rows' features stay in the feature cache and
reach the workers' first-token pass as a streamed set (evaluation.py), never the driver.

Classifier alignment (replay.align_weight, as SLCA aligns its classifier on class statistics): while a task trains,
the LLM's first-token posterior over the old classes on each replayed pseudo-feature is pulled toward the ridge
head's (`alignment_target`, with the last chosen temperature), so old classes keep the ridge's margins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .class_stats import ClassStatistics
from .closed_form import Ridge, holdout_mask
from .features import FeatureSet, FeatureTable, pooled_unit

RIDGE_SCALES = tuple(float(a) for a in np.logspace(0, 3, 13))  # a: the ridge scores' inverse temperature
GENERATIVE_WEIGHTS = (0.0,) + tuple(float(w) for w in np.logspace(-3, 0.5, 15))  # b / a


@dataclass
class Validation:
    """The rows the fusion's weights are chosen on: the task's held-out rows (streamed, as the task's rows are),
    pseudo-features of the old classes, the class index among the seen classes of each (held rows first), and the
    scores of the ridge fitted without the held rows."""

    held: FeatureSet | FeatureTable
    pseudo: np.ndarray  # (P, T, D) float32
    targets: np.ndarray  # (len(held) + P,)
    ridge_scores: torch.Tensor  # (len(held) + P, C) float64


def choose_fusion(ridge_scores: torch.Tensor, generative: torch.Tensor, targets: np.ndarray) -> tuple[float, float]:
    """(a, b) of the grid with the lowest validation cross-entropy of softmax(a * ridge + b * generative); the first
    on ties (the smallest scale, then the smallest weight: ridge alone when the generative score does not help)."""
    targets_t = torch.as_tensor(targets)
    ridge, generative = ridge_scores.double(), generative.double()
    best, chosen = float("inf"), (1.0, 0.0)
    for a in RIDGE_SCALES:
        for weight in GENERATIVE_WEIGHTS:
            loss = float(F.cross_entropy(a * ridge + a * weight * generative, targets_t))
            if loss < best - 1e-12:
                best, chosen = loss, (a, a * weight)
    return chosen


def draw_pseudo(stats: ClassStatistics, classes: list[str], rng: np.random.Generator) -> np.ndarray:
    """One pseudo-feature per entry of `classes` (repeats allowed) from its class Gaussian: (N, T, D) float32."""
    if not classes:
        return np.zeros((0, 0, 0), np.float32)
    mean, std = stats.matrix("mean", classes), stats.matrix("std", classes)
    return (mean + std * rng.standard_normal(mean.shape)).astype(np.float32)


class RidgeFusion:
    """The ridge rule's own state: the ridge (sufficient statistics, closed_form.Ridge) and the (a, b) chosen after
    each task. A run-state component: persisted after every task, so a resumed run continues with both."""

    def __init__(self, seed: int = 0):
        self.ridge = Ridge(seed=seed)
        self.chosen: list[tuple[float, float]] = []

    @property
    def scale(self) -> float:
        """The last chosen inverse temperature of the ridge scores (1 before any choice)."""
        return self.chosen[-1][0] if self.chosen else 1.0

    def held_out(self, task: FeatureSet | FeatureTable) -> np.ndarray:
        """The task's validation rows (True): no projection, and no ridge scoring them, trains on them."""
        labels = np.asarray([str(c) for c in task.labels], dtype=object)
        return holdout_mask(labels, np.asarray(task.keys), self.ridge.seed)

    def learn_and_validate(self, task: FeatureSet | FeatureTable, stats: ClassStatistics, seen: list[str], seed: int,
                           pseudo_per_class: int) -> Validation:
        """Learns `task` into the ridge; returns the task's held-out rows and pseudo-features of the old classes
        (drawn from `stats`, which must not have learned the task yet), scored by the ridge of the statistics before
        the task plus its kept rows, with the lambda `learn` chose on those same held-out rows."""
        ridge = self.ridge
        x, labels = ridge.embed(task), np.asarray([str(c) for c in task.labels], dtype=object)
        held = self.held_out(task)
        fit = ridge.without(x, labels, held)
        ridge.learn_embedded(x, labels, np.asarray(task.keys))
        weight, bias = ridge.solve(fit, ridge.chosen[-1])
        draws = [c for c in seen if c not in set(labels) for _ in range(pseudo_per_class)]
        pseudo = draw_pseudo(stats, draws, np.random.default_rng([seed, len(seen)]))
        embedded = x[torch.from_numpy(held)]
        if draws:
            embedded = torch.cat([embedded, pooled_unit(pseudo).double()])
        columns = torch.tensor([fit.classes.index(c) for c in seen])
        names = [*labels[held], *draws]
        return Validation(task.subset(held), pseudo, np.asarray([seen.index(n) for n in names], dtype=np.int64),
                          embedded @ weight[:, columns] + bias[columns])

    def head(self, classes: list[str]) -> torch.Tensor:
        """(C, D) float32 weights of the ridge's current fit, one row per class (what classify's rule multiplies)."""
        columns = torch.tensor([self.ridge.stats.classes.index(c) for c in classes])
        return self.ridge.weight[:, columns].T.float().contiguous()

    @property
    def memory_bytes(self) -> int:
        return self.ridge.memory_bytes

    def state_dict(self) -> dict:
        return {"ridge": self.ridge.state_dict(), "chosen": [list(c) for c in self.chosen]}

    def load_state_dict(self, state: dict) -> None:
        self.ridge.load_state_dict(state["ridge"])
        self.chosen = [(float(a), float(b)) for a, b in state["chosen"]]


def alignment_target(features: np.ndarray, head: torch.Tensor, scale: float, token_of_class: torch.Tensor,
                     tokens: int) -> torch.Tensor:
    """(N, K) the ridge head's posterior softmax(scale * ridge(x)) over the classes, summed per first name token
    (classes sharing one add up): what classifier alignment pulls the LLM's first-token posterior toward."""
    x = pooled_unit(np.asarray(features, dtype=np.float32))
    posterior = (scale * x @ head.float().T).softmax(-1)
    return torch.zeros(len(x), tokens).index_add_(1, token_of_class, posterior)
