"""The Matcher deployment: the text encoder and its label bank (class-name embeddings, cached by name across
versions). Only the `free` rule uses it: the Captioner hands it the generated answers with the version's class
list (serve/captioner.py, `RemoteMatcher`), so matching is always against the classes of the version that wrote
them, whichever version the Matcher last warmed up."""
from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
from ray import serve

from .settings import MatcherConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Matcher", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Matcher:
    def __init__(self, store_url: str, storage_options: dict, stack: dict, threads: int = 1):
        import torch

        from cil_platform.storage.store import ProjectionStore
        from gmm_model import ModelStack, create_matcher

        torch.set_num_threads(threads)
        self.store = ProjectionStore(store_url, storage_options)
        self.matcher = create_matcher(ModelStack.model_validate(stack))
        self.lock = threading.Lock()
        self.version: int | None = None

    async def reconfigure(self, user_config: dict) -> None:
        config = MatcherConfig.model_validate(user_config or {})
        await asyncio.to_thread(self._warm, config.version)

    def _warm(self, version: int | None) -> None:
        try:
            manifest = self.store.latest() if version is None else self.store.manifest(version)
            if manifest is None:
                return
            with self.lock:
                self.matcher.label_bank(list(manifest.seen_classes))
            self.version = manifest.version
        except Exception:  # warming is an optimisation; matching works from the class list it is given
            logger.exception("could not warm the label bank for version %s", version)

    async def similarities(self, texts: list[str], class_names: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self._similarities, texts, class_names)

    def _similarities(self, texts: list[str], class_names: list[str]) -> np.ndarray:
        with self.lock:
            return self.matcher.similarities(texts, class_names).numpy()
