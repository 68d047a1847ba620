"""The paper's visual stack: EVA ViT-g and the BLIP-2 Q-Former, as MiniGPT-4 uses them.

Built from Hugging Face's Blip2 classes and a Blip2 checkpoint (hub name or directory, e.g.
Salesforce/blip2-flan-t5-xxl, whose vision model and Q-Former are the ones MiniGPT-4 loads). Only the
vision model, the query tokens and the Q-Former are read: a sharded checkpoint's index says which
shards hold them, so the language model's shards (tens of GB) are never downloaded or loaded.
Output: `num_query_tokens` (32) tokens of the Q-Former's width (768), which the projection maps to
the LLM's width, as MiniGPT-4's `llama_proj` does.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from .spec import Pooling
from .vision import VisionEncoder, normalise, resize_batch
from .weights import fetch, files_signature

VISUAL_PREFIXES = ("vision_model.", "query_tokens", "qformer.")
# BLIP-2's image processor: OpenAI CLIP statistics, bicubic resize of the whole image to a square
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def visual_weights(location: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The vision model, query tokens and Q-Former tensors of a Blip2 checkpoint, and the files read."""
    from safetensors import safe_open

    index = fetch(location, "model.safetensors.index.json", required=False)
    if index is None:
        shards = ["model.safetensors"]
    else:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(VISUAL_PREFIXES)})
    paths = [fetch(location, shard) for shard in shards]
    state = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys() if key.startswith(VISUAL_PREFIXES)})
    return state, paths


class Blip2QFormerEncoder(VisionEncoder):
    """EVA ViT-g -> BLIP-2 Q-Former: (B, num_query_tokens, qformer width) tokens, in float32."""

    def __init__(self, location: str, image_size: int, pooling: Pooling = "all"):
        super().__init__()
        from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

        if pooling != "all":
            raise ValueError(f"pooling {pooling!r}: the Q-Former's output is its query tokens, which form no "
                             "spatial grid and have no CLS token; use pooling=all")
        with open(fetch(location, "config.json")) as f:
            settings = json.load(f)
        if settings.get("model_type") != "blip-2":
            raise ValueError(f"{location!r} is not a Blip2 checkpoint: its config.json has model_type "
                             f"{settings.get('model_type')!r}, not 'blip-2'")
        config = Blip2Config.from_dict(settings)
        with torch.device("meta"):  # no random init of a billion parameters that are overwritten next
            self.vision_model = Blip2VisionModel(config.vision_config)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel(config.qformer_config)
        state, files = visual_weights(location)
        wanted = list(self.state_dict())
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ValueError(f"Blip2 checkpoint {location!r} lacks {len(missing)} visual tensors, e.g. {missing[:3]}")
        self.load_state_dict({key: state[key] for key in wanted}, strict=True, assign=True)
        self.float().eval().requires_grad_(False)
        self.location, self.image_size, self.signature = location, image_size, files_signature(files)
        self.interpolate = image_size != config.vision_config.image_size  # resample the position embedding
        self.measure_output(image_size)

    @property
    def identity(self) -> str:
        return f"blip2:{self.location}:{self.signature}@{self.image_size}px/query{self.num_tokens}/bicubic"

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return normalise(resize_batch(images, self.image_size, "bicubic"), CLIP_MEAN, CLIP_STD)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask).last_hidden_state
