"""Evaluation after each task: every seen class's test images, generate -> match (or trie) -> accuracy.

A small pool of long-lived Ray actors holds the frozen LLM (and matcher) for the whole experiment;
each task only ships the new projection to them. They reserve no CPU so they never block the
training workers they alternate with; each uses the threads it is given.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from gmm_model import ModelStack, create_gmm, create_matcher
from gmm_model.predict import first_token_prior, fuse_with_prototypes, predict

from .features import FeatureTable


class ClassMeans:
    """Each seen class's mean features (T, D): class statistics, not exemplars. The evaluators estimate
    the first-token prior on them (gmm_model.predict.first_token_prior)."""

    def __init__(self) -> None:
        self.means: dict[str, np.ndarray] = {}

    def learn(self, train: FeatureTable, seen: list[str] | None = None) -> None:
        for name, features in train.by_class():
            self.means[name] = features.mean(0)

    def matrix(self, classes: list[str]) -> np.ndarray:
        """(C, T, D) in the order of `classes`."""
        return np.stack([self.means[c] for c in classes])

    @property
    def memory_bytes(self) -> int:
        return sum(m.nbytes for m in self.means.values())

    def state_dict(self) -> dict:
        return {"classes": list(self.means), "means": list(self.means.values())}

    def load_state_dict(self, state: dict) -> None:
        self.means = {name: np.array(m) for name, m in zip(state["classes"], state["means"])}


class Evaluator:
    def __init__(self, stack: ModelStack, visual_width: int, cache_dir: str, mode: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.gmm = create_gmm(stack, visual_width, cache_dir)
        self.matcher = create_matcher(stack) if mode == "free" else None
        self.mode = mode

    def set_projection(self, weights: bytes) -> None:
        self.gmm.projection.load_bytes(weights)

    def first_token_log_prob(self, features: np.ndarray, class_names: list[str], batch_size: int) -> np.ndarray:
        """(N, C) log p(first name token of each class) for N feature sets (the prior's inputs)."""
        trie = self.gmm.label_trie(class_names)
        return torch.cat([self.gmm.first_token_log_prob(_batch(features, s, batch_size), trie)
                          for s in range(0, len(features), batch_size)]).numpy()

    def predict(self, features: np.ndarray, class_names: list[str], batch_size: int,
                prototypes: np.ndarray | None = None, prior: np.ndarray | None = None) -> dict[str, list[str]]:
        """Labels per decoding rule. free: the paper's rule. trie: constrained decoding ("trie", or
        "trie+prior" when a first-token prior is given), plus its fusion with class prototypes
        ("...+ncm") from the same forward pass when prototypes are given."""
        if self.mode != "trie":
            return {self.mode: [p.label for s in range(0, len(features), batch_size)
                                for p in predict(self.gmm, _batch(features, s, batch_size), class_names, self.mode,
                                                 self.matcher)]}
        rule = "trie+prior" if prior is not None else "trie"
        out: dict[str, list[str]] = {rule: [], **({f"{rule}+ncm": []} if prototypes is not None else {})}
        trie = self.gmm.label_trie(class_names)
        prior_t = torch.tensor(prior) if prior is not None else None  # copies: object-store arrays are read-only
        protos = torch.tensor(prototypes) if prototypes is not None else None
        for start in range(0, len(features), batch_size):
            visual = _batch(features, start, batch_size)
            decoded = self.gmm.decode_constrained(visual, trie, prior_t)
            out[rule] += [class_names[i] for i in decoded.classes.tolist()]
            if protos is not None:
                generative = decoded.first_token_log_prob - (prior_t if prior_t is not None else 0.0)
                out[f"{rule}+ncm"] += [class_names[i] for i in fuse_with_prototypes(generative, visual, protos).tolist()]
        return out


def _batch(features: np.ndarray, start: int, size: int) -> torch.Tensor:
    return torch.from_numpy(features[start:start + size].astype(np.float32))


class EvaluatorPool:
    """`actors` Evaluator actors; a call splits the images evenly among them."""

    def __init__(self, actors: int, stack: ModelStack, visual_width: int, cache_dir: str, mode: str,
                 batch_size: int):
        remote = ray.remote(num_cpus=0)(Evaluator)
        self.actors = [remote.remote(stack, visual_width, cache_dir, mode) for _ in range(actors)]
        self.batch_size = batch_size

    def _split(self, method: str, features: np.ndarray, *args) -> list:
        chunks = np.array_split(np.arange(len(features)), len(self.actors))
        return ray.get([getattr(a, method).remote(features[idx], *args)
                        for a, idx in zip(self.actors, chunks) if len(idx)])

    def predict(self, weights: bytes, test: FeatureTable, class_names: list[str],
                prototypes: np.ndarray | None = None, class_means: np.ndarray | None = None) -> dict[str, list[str]]:
        """`class_means` ((C, T, D) mean features of each class, in class order) turn on the first-token
        prior correction (trie only): the prior is the model's average first-token preference over them."""
        ref = ray.put(weights)
        ray.get([a.set_projection.remote(ref) for a in self.actors])
        prior = None
        if class_means is not None:
            scores = np.concatenate(self._split("first_token_log_prob", class_means, class_names, self.batch_size))
            prior = first_token_prior(torch.from_numpy(scores)).numpy()
        parts = self._split("predict", test.features, class_names, self.batch_size, prototypes, prior)
        return {rule: [label for part in parts for label in part[rule]] for rule in parts[0]}

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
