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
from gmm_model.predict import fuse_with_prototypes, predict

from .features import FeatureTable


class Evaluator:
    def __init__(self, stack: ModelStack, visual_width: int, cache_dir: str, mode: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.gmm = create_gmm(stack, visual_width, cache_dir)
        self.matcher = create_matcher(stack) if mode == "free" else None
        self.mode = mode

    def set_projection(self, weights: bytes) -> None:
        self.gmm.projection.load_bytes(weights)

    def predict(self, features: np.ndarray, class_names: list[str], batch_size: int,
                prototypes: np.ndarray | None = None) -> dict[str, list[str]]:
        """Labels per decoding rule: the configured mode, plus "trie+ncm" (the fusion with class
        prototypes) from the same forward pass when prototypes are given and the mode is trie."""
        out: dict[str, list[str]] = {self.mode: []}
        fuse = prototypes is not None and self.mode == "trie"
        if fuse:
            out["trie+ncm"] = []
            protos = torch.tensor(prototypes)  # a copy: arrays from Ray's object store are read-only
        for start in range(0, len(features), batch_size):
            visual = torch.from_numpy(features[start:start + batch_size].astype(np.float32))
            if fuse:
                decoded = self.gmm.decode_constrained(visual, self.gmm.label_trie(class_names))
                out["trie"] += [class_names[i] for i in decoded.classes.tolist()]
                fused = fuse_with_prototypes(decoded.first_token_log_prob, visual, protos)
                out["trie+ncm"] += [class_names[i] for i in fused.tolist()]
            else:
                out[self.mode] += [p.label for p in predict(self.gmm, visual, class_names, self.mode, self.matcher)]
        return out


class EvaluatorPool:
    """`actors` Evaluator actors; a prediction call splits the images evenly among them."""

    def __init__(self, actors: int, stack: ModelStack, visual_width: int, cache_dir: str, mode: str,
                 batch_size: int):
        remote = ray.remote(num_cpus=0)(Evaluator)
        self.actors = [remote.remote(stack, visual_width, cache_dir, mode) for _ in range(actors)]
        self.batch_size = batch_size

    def predict(self, weights: bytes, test: FeatureTable, class_names: list[str],
                prototypes: np.ndarray | None = None) -> dict[str, list[str]]:
        ref = ray.put(weights)
        ray.get([a.set_projection.remote(ref) for a in self.actors])
        chunks = np.array_split(np.arange(len(test)), len(self.actors))
        futures = [a.predict.remote(test.features[idx], class_names, self.batch_size, prototypes)
                   for a, idx in zip(self.actors, chunks) if len(idx)]
        parts = ray.get(futures)
        return {rule: [label for part in parts for label in part[rule]] for rule in parts[0]}

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
