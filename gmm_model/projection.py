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
        return self.load_tensors(load(blob))

    def load_tensors(self, state: dict[str, torch.Tensor]) -> "Projection":
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(f"projection weights have shapes {got}, this model needs {expected}")
        self.load_state_dict(state)
        return self

    def load_pretrained(self, path: str | Path) -> "Projection":
        """Start from a file: our safetensors, or a MiniGPT-4 checkpoint (.pth) -- see minigpt4_projection."""
        if not Path(path).is_file():
            raise ValueError(f"projection file {str(path)!r} does not exist")
        if str(path).endswith(".safetensors"):
            return self.load_file(path)
        return self.load_tensors(minigpt4_projection(path))

    def save_file(self, path: str | Path) -> str:
        """Write safetensors; returns the sha256 of what was written."""
        blob = self.to_bytes()
        Path(path).write_bytes(blob)
        return hashlib.sha256(blob).hexdigest()

    def load_file(self, path: str | Path) -> "Projection":
        return self.load_bytes(Path(path).read_bytes())


# MiniGPT-4 keeps its one trained layer, `llama_proj = nn.Linear(768, llm_width)`, in the "model" dict
# of its checkpoint (e.g. prerained_minigpt4_7b.pth); Projection is the same nn.Linear, so the mapping
# is one name per tensor.
MINIGPT4_KEYS = {"weight": "llama_proj.weight", "bias": "llama_proj.bias"}


def minigpt4_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """Projection tensors from a MiniGPT-4 checkpoint: {"model": {"llama_proj.weight", "llama_proj.bias", ...}}
    (a bare state dict is accepted too). Read with torch.load(weights_only=True): no code is unpickled."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one that would need arbitrary unpickling
        raise ValueError(f"cannot read MiniGPT-4 checkpoint {str(path)!r}: {error}") from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    missing = [key for key in MINIGPT4_KEYS.values() if key not in state]
    if missing:
        keys = sorted(k for k in state if isinstance(k, str))
        raise ValueError(f"{str(path)!r} is not a MiniGPT-4 checkpoint: no {missing} among {keys[:8]}")
    return {ours: state[theirs].float() for ours, theirs in MINIGPT4_KEYS.items()}
