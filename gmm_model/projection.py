"""The projection: the only trained part of GMM. Visual tokens -> the LLM's embedding space."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import nn


class Projection(nn.Linear):
    """A linear map from the encoder's token width to the LLM's hidden size."""

    def __init__(self, visual_width: int, llm_width: int):
        super().__init__(visual_width, llm_width)

    def to_bytes(self) -> bytes:
        return save({k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()})

    def load_bytes(self, blob: bytes) -> "Projection":
        state = load(blob)
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(f"projection weights have shapes {got}, this model needs {expected}")
        self.load_state_dict(state)
        return self

    def save_file(self, path: str | Path) -> str:
        """Write safetensors; returns the sha256 of what was written."""
        blob = self.to_bytes()
        Path(path).write_bytes(blob)
        return hashlib.sha256(blob).hexdigest()

    def load_file(self, path: str | Path) -> "Projection":
        return self.load_bytes(Path(path).read_bytes())

    @torch.no_grad()
    def copy_from(self, other: nn.Linear) -> "Projection":
        self.load_state_dict(other.state_dict())
        return self
