"""Evaluation after each task: every seen class's test features through `gmm_model.classify`, once per rule.

It runs on the training session's own workers (training/session.py), which already hold the frozen LLM: each
worker reads its shard of the test set (a Ray Dataset of the feature cache: the features never pass through the
driver) and classifies it with the new projection, so an experiment keeps one set of LLM copies and starts none per
task. A worker answers one class index per image and rule, not features or strings. The statistics a rule needs (the
first-token prior, estimated here with the new projection over the class means; the prototypes; the ridge head and
the fusion weights chosen on validation rows, cil_platform/fusion.py) come back with the labels, so the store
publishes exactly what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gmm_model.classify import ClassifierStats, Rule, classify_rules, first_token_prior

from .features import FeatureSet, FeatureTable
from .fusion import Validation, choose_fusion
from .training.session import TrainingSession


@dataclass
class Evaluation:
    labels: dict[Rule, list[str]]  # per rule, one predicted class name per test image
    stats: ClassifierStats  # what the rules were given: publish these with the projection


def _batches(features: np.ndarray, size: int):
    for start in range(0, len(features), size):
        yield torch.from_numpy(features[start:start + size].astype(np.float32))


def first_token_log_prob(gmm, matcher, features: np.ndarray, class_names: list[str], batch_size: int) -> np.ndarray:
    """(N, C) log p(first name token of each class) for N feature sets (the prior's inputs). A shard function."""
    trie = gmm.label_trie(class_names)
    scores = [gmm.first_token_log_prob(batch, trie) for batch in _batches(features, batch_size)]
    return torch.cat(scores).numpy() if scores else np.zeros((0, len(class_names)), np.float32)


def predict(gmm, matcher, features: np.ndarray, class_names: list[str], batch_size: int, rules: list[Rule],
            stats: ClassifierStats) -> dict[Rule, np.ndarray]:
    """Each rule's predicted class (its index in `class_names`, int32) for each feature set. A shard function."""
    column = {name: i for i, name in enumerate(class_names)}
    out: dict[Rule, list[int]] = {rule: [] for rule in rules}
    for batch in _batches(features, batch_size):
        for rule, predictions in classify_rules(gmm, batch, class_names, rules, stats, matcher).items():
            out[rule] += [column[p.label] for p in predictions]
    return {rule: np.asarray(found, dtype=np.int32) for rule, found in out.items()}


def first_token_scores(session: TrainingSession, weights: bytes, rows, class_names: list[str],
                       batch_size: int) -> torch.Tensor:
    """(N, C) first-token log-probabilities of `rows` (an array, or a set each worker streams its shard of)."""
    if not len(rows):
        return torch.zeros(0, len(class_names))
    parts = session.map_shards(first_token_log_prob, weights, rows, class_names, batch_size)
    return torch.from_numpy(np.concatenate(parts))


def evaluate(session: TrainingSession, weights: bytes, test: FeatureSet | FeatureTable, class_names: list[str],
             rules: list[Rule], batch_size: int, class_means: np.ndarray | None = None,
             prototypes: np.ndarray | None = None, ridge_head: torch.Tensor | None = None,
             validation: Validation | None = None) -> Evaluation:
    """Labels of `test` under each rule, with the projection `weights`. `class_means` ((C, T, D), class order) are
    needed by prior rules: the prior is the model's average first-token preference over them; `prototypes`
    ((C, D)) by prototype rules; `ridge_head` ((C, D)) and the `validation` rows its fusion weights are chosen on by
    the ridge rule (the pseudo-features' first-token scores come from the same pass as the prior's)."""
    prior = fusion = None
    if any(rule.prior for rule in rules):
        rows = class_means if validation is None else np.concatenate(
            [class_means.astype(np.float32), validation.pseudo.reshape(-1, *class_means.shape[1:])])
        scores = first_token_scores(session, weights, rows, class_names, batch_size)
        prior = first_token_prior(scores[: len(class_means)])
        if validation is not None:
            held = first_token_scores(session, weights, validation.held, class_names, batch_size)
            generative = torch.cat([held, scores[len(class_means):]]) - prior
            fusion = torch.tensor(choose_fusion(validation.ridge_scores, generative, validation.targets),
                                  dtype=torch.float64)
    ridge = any(r.ridge for r in rules)
    stats = ClassifierStats(prior, torch.tensor(prototypes) if any(r.prototypes for r in rules) else None,
                            ridge_head if ridge else None, fusion if ridge else None)
    parts = session.map_shards(predict, weights, test, class_names, batch_size, rules, stats,
                               matcher=any(rule is Rule.FREE for rule in rules))
    return Evaluation({rule: [class_names[i] for part in parts for i in part[rule]] for rule in rules}, stats)
