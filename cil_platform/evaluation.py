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
from gmm_model.predict import predict

from .features import FeatureTable


class Evaluator:
    def __init__(self, stack: ModelStack, visual_width: int, cache_dir: str, mode: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.gmm = create_gmm(stack, visual_width, cache_dir)
        self.matcher = create_matcher(stack) if mode == "free" else None
        self.mode = mode

    def set_projection(self, weights: bytes) -> None:
        self.gmm.projection.load_bytes(weights)

    def predict(self, features: np.ndarray, class_names: list[str], batch_size: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(features), batch_size):
            visual = torch.from_numpy(features[start:start + batch_size].astype(np.float32))
            out += [p.label for p in predict(self.gmm, visual, class_names, self.mode, self.matcher)]
        return out


class EvaluatorPool:
    """`actors` Evaluator actors; a prediction call splits the images evenly among them."""

    def __init__(self, actors: int, stack: ModelStack, visual_width: int, cache_dir: str, mode: str,
                 batch_size: int):
        remote = ray.remote(num_cpus=0)(Evaluator)
        self.actors = [remote.remote(stack, visual_width, cache_dir, mode) for _ in range(actors)]
        self.batch_size = batch_size

    def predict(self, weights: bytes, test: FeatureTable, class_names: list[str]) -> list[str]:
        ref = ray.put(weights)
        ray.get([a.set_projection.remote(ref) for a in self.actors])
        chunks = np.array_split(np.arange(len(test)), len(self.actors))
        futures = [a.predict.remote(test.features[idx], class_names, self.batch_size)
                   for a, idx in zip(self.actors, chunks) if len(idx)]
        return [label for part in ray.get(futures) for label in part]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
