"""The factory over a model stack: a gmm_model.spec.ModelStack's names turned into loaded modules.

As open_clip's `create_model`: each create_* function picks the loader a name asks for; the loaders get
their files from gmm_model.weights. The presets and their memory needs are documented in
docs/model_stacks.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .llm import load_frozen_llm
from .matcher import OpenCLIPTextMatcher, SentenceTransformerMatcher, TextMatcher
from .model import GMM
from .projection import Projection
from .prompt import chat_format
from .spec import ENCODER_KINDS, ENCODERS, ModelStack
from .vision import EfficientNetLiteEncoder, VisionEncoder

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names (float32, bfloat16, float16): one table for stacks and training."""
    try:
        return _TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(_TORCH_DTYPES)}") from None


def create_encoder(stack: ModelStack) -> VisionEncoder:
    """The frozen vision encoder the stack names, with its weights."""
    kind, _, name = stack.encoder.partition(":")
    if stack.encoder in ENCODERS:
        return EfficientNetLiteEncoder(stack.encoder, stack.image_size, stack.grid, stack.pooling)
    if kind == "open_clip" and name:
        from .backbones import OpenCLIPImageEncoder

        return OpenCLIPImageEncoder(name, stack.encoder_weights, stack.image_size, stack.pooling, stack.grid)
    if kind == "timm" and name:
        from .backbones import TimmEncoder

        return TimmEncoder(name, stack.encoder_weights, stack.image_size, stack.pooling, stack.grid)
    if kind == "blip2" and name:
        from .blip2 import Blip2QFormerEncoder

        return Blip2QFormerEncoder(name, stack.image_size, stack.pooling)
    raise ValueError(f"unknown encoder {stack.encoder!r}; known: {', '.join(ENCODERS)}, "
                     f"or {', '.join(k + ':<name>' for k in ENCODER_KINDS)}")


def create_matcher(stack: ModelStack) -> TextMatcher:
    kind, _, name = stack.matcher.partition(":")
    if kind == "open_clip" and name:
        return OpenCLIPTextMatcher(name, stack.matcher_weights)
    return SentenceTransformerMatcher(stack.matcher)


def create_gmm(stack: ModelStack, visual_width: int, cache_dir: str | Path,
               projection: bytes | None = None, dtype: torch.dtype | None = None) -> GMM:
    """The frozen LLM plus a projection: trained (safetensors bytes), else the stack's projection_init, else fresh.

    `dtype` overrides the stack's llm_dtype.
    """
    llm, tokenizer = load_frozen_llm(stack.llm, cache_dir, dtype or torch_dtype(stack.llm_dtype), stack.llm_quantization)
    proj = initial_projection(stack, visual_width, llm.get_input_embeddings().embedding_dim, projection)
    prompt = chat_format(stack.prompt, tokenizer) if stack.chat_template else stack.prompt
    return GMM(llm, tokenizer, proj, prompt)


def initial_projection(stack: ModelStack, visual_width: int, llm_width: int, weights: bytes | None) -> Projection:
    """`weights` (safetensors bytes), else the stack's projection_init, else a fresh one (torch's RNG)."""
    projection = Projection(visual_width, llm_width)
    if weights is not None:
        projection.load_bytes(weights)
    elif stack.projection_init:
        projection.load_pretrained(stack.projection_init)
    return projection
