"""Pretrained image backbones by name: open_clip image towers and timm models.

Both give a last feature map (a CNN's spatial map, or a ViT's patch tokens laid out on their grid,
through the final norm) and the network's own pooled embedding (ViT CLS token, CLIP's image
embedding, a CNN's global pool). Visual tokens are that map pooled to a grid, every cell of it, or
the pooled embedding alone (`pooling` = grid / all / cls).
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import Pooling
from .vision import VisionEncoder, normalise, pooling_name, pool_tokens, resize_batch
from .weights import local_weights_file, weights_id

OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


class BackboneEncoder(VisionEncoder):
    """Shared by the open_clip and timm encoders: preprocessing, pooling and identity."""

    def __init__(self, source: str, image_size: int, pooling: Pooling, grid: int,
                 mean: tuple[float, ...], std: tuple[float, ...], interpolation: str):
        super().__init__()
        self.source, self.image_size, self.pooling, self.grid = source, image_size, pooling, grid
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"

    @property
    def identity(self) -> str:
        return f"{self.source}@{self.image_size}px/{pooling_name(self.pooling, self.grid)}/{self.interpolation}"

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return normalise(resize_batch(images, self.image_size, self.interpolation), self.mean, self.std)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) output of the last block."""
        raise NotImplementedError

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) the network's own image embedding."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return self.pooled(pixels)[:, None]
        return pool_tokens(self.feature_map(pixels), self.pooling, self.grid)


def create_open_clip(name: str, weights: str | None, **kwargs) -> torch.nn.Module:
    """An open_clip model by name with its weights: a pretrained tag (downloaded from its usual source)
    or a local file. `hf-hub:` / `local-dir:` names carry their own weights."""
    import open_clip

    if weights is None and not name.startswith(OPEN_CLIP_SCHEMAS):
        raise ValueError(f"open_clip model {name!r} needs weights: a pretrained tag such as 'openai' "
                         f"(known: {open_clip.list_pretrained_tags_by_model(name) or 'none'}) or a local file")
    if weights is not None and open_clip.get_pretrained_cfg(name, weights).get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # e.g. OpenAI's ViT-B-16 was trained with QuickGELU; the plain config has GELU
    try:
        model = open_clip.create_model(name, pretrained=weights, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load open_clip model {name!r} with weights {weights!r}: {error}") from error
    return model.eval().requires_grad_(False)


class OpenCLIPImageEncoder(BackboneEncoder):
    """An open_clip image tower (ViT, ModifiedResNet or timm trunk); the text tower is dropped."""

    def __init__(self, name: str, weights: str | None, image_size: int, pooling: Pooling = "grid", grid: int = 2):
        model = create_open_clip(name, weights, force_image_size=image_size)
        cfg = model.visual.preprocess_cfg
        super().__init__(f"open_clip:{name}/{weights_id(weights)}", image_size, pooling, grid,
                         cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))
        self.visual = model.visual
        self.measure_output(image_size)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["image_intermediates"][-1]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class TimmEncoder(BackboneEncoder):
    """A timm model by name: pretrained weights from its usual source (the hub, per the name's tag), or a
    local weights file through timm's own loader (`pretrained_cfg_overlay=dict(file=...)`)."""

    def __init__(self, name: str, weights: str | None, image_size: int, pooling: Pooling = "grid", grid: int = 2):
        import timm
        from timm.data import resolve_model_data_config

        overlay = {"pretrained_cfg_overlay": {"file": local_weights_file(weights, f"timm model {name!r}")}} if weights else {}
        try:
            net = timm.create_model(name, pretrained=True, **overlay)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load timm model {name!r} with weights {weights!r}: {error}") from error
        native = net.pretrained_cfg.get("input_size", (3, image_size, image_size))[-1]
        if image_size != native and hasattr(net, "set_input_size"):  # ViTs: resample the position embedding
            net.set_input_size(img_size=image_size)
        cfg = resolve_model_data_config(net)
        super().__init__(f"timm:{name}/{weights_id(weights)}", image_size, pooling, grid,
                         cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))
        self.net = net.eval().requires_grad_(False)
        self.measure_output(image_size)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.forward_intermediates(pixels, indices=1, norm=True, intermediates_only=True)[-1]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(pixels), pre_logits=True)
