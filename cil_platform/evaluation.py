"""Evaluation after each task: every seen class's test features through `gmm_model.classify`, once per rule.

A small pool of long-lived Ray actors holds the frozen LLM (and matcher) for the whole experiment; each task only
ships the new projection to them. They reserve no CPU so they never block the training workers they alternate
with; each uses the threads it is given. The statistics a rule needs (the first-token prior, estimated here with
the new projection; the prototypes) come back with the labels, so the store publishes exactly what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

from gmm_model import create_gmm, create_matcher
from gmm_model.classify import ClassifierStats, Rule, classify_rules, first_token_prior
from gmm_model.spec import ModelStack

from .features import FeatureTable


@dataclass
class Evaluation:
    labels: dict[Rule, list[str]]  # per rule, one predicted class name per test image
    stats: ClassifierStats  # what the rules were given: publish these with the projection


class Evaluator:
    def __init__(self, stack: dict, visual_width: int, cache_dir: str, matcher: bool, threads: int = 1):
        torch.set_num_threads(threads)
        stack = ModelStack.model_validate(stack)
        self.gmm = create_gmm(stack, visual_width, cache_dir)
        self.matcher = create_matcher(stack) if matcher else None

    def set_projection(self, weights: bytes) -> None:
        self.gmm.projection.load_bytes(weights)

    def first_token_log_prob(self, features: np.ndarray, class_names: list[str], batch_size: int) -> np.ndarray:
        """(N, C) log p(first name token of each class) for N feature sets (the prior's inputs)."""
        trie = self.gmm.label_trie(class_names)
        return torch.cat([self.gmm.first_token_log_prob(_batch(features, s, batch_size), trie)
                          for s in range(0, len(features), batch_size)]).numpy()

    def predict(self, features: np.ndarray, class_names: list[str], batch_size: int, rules: list[Rule],
                stats: ClassifierStats) -> dict[Rule, list[str]]:
        out: dict[Rule, list[str]] = {rule: [] for rule in rules}
        for start in range(0, len(features), batch_size):
            for rule, predictions in classify_rules(self.gmm, _batch(features, start, batch_size), class_names,
                                                    rules, stats, self.matcher).items():
                out[rule] += [p.label for p in predictions]
        return out


def _batch(features: np.ndarray, start: int, size: int) -> torch.Tensor:
    return torch.from_numpy(features[start:start + size].astype(np.float32))


class EvaluatorPool:
    """`actors` Evaluator actors; a call splits the images evenly among them."""

    def __init__(self, actors: int, stack: ModelStack, visual_width: int, cache_dir: str, matcher: bool,
                 batch_size: int):
        remote = ray.remote(num_cpus=0)(Evaluator)
        self.actors = [remote.remote(stack.model_dump(), visual_width, cache_dir, matcher) for _ in range(actors)]
        self.batch_size = batch_size

    def _split(self, method: str, features: np.ndarray, *args) -> list:
        chunks = np.array_split(np.arange(len(features)), len(self.actors))
        return ray.get([getattr(a, method).remote(features[idx], *args)
                        for a, idx in zip(self.actors, chunks) if len(idx)])

    def evaluate(self, weights: bytes, test: FeatureTable, class_names: list[str], rules: list[Rule],
                 class_means: np.ndarray | None = None, prototypes: np.ndarray | None = None) -> Evaluation:
        """Labels of `test` under each rule. `class_means` ((C, T, D), class order) are needed by prior rules:
        the prior is the model's average first-token preference over them; `prototypes` ((C, D)) by fused rules."""
        ref = ray.put(weights)
        ray.get([a.set_projection.remote(ref) for a in self.actors])
        prior = None
        if any(rule.prior for rule in rules):
            scores = np.concatenate(self._split("first_token_log_prob", class_means, class_names, self.batch_size))
            prior = first_token_prior(torch.from_numpy(scores))
        stats = ClassifierStats(prior, torch.tensor(prototypes) if any(r.prototypes for r in rules) else None)
        parts = self._split("predict", test.features, class_names, self.batch_size, rules, stats)
        return Evaluation({rule: [label for part in parts for label in part[rule]] for rule in rules}, stats)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
