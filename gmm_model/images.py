"""One image decoder for training and serving: bytes -> HxWx3 uint8 RGB, the same pixels on both paths.

A model answers well only on images prepared as it was trained on, so the dataset loaders
(cil_platform/data/rows.py) and the service (serve/inputs.py) both call `decode_rgb`:

- formats: an allow-list (ALLOWED_FORMATS); anything else is refused, even where Pillow could open it;
- size: width x height from the header is checked against `max_pixels` before any pixel is decoded;
- orientation: the EXIF orientation is applied (a phone photo is upright);
- depth: 16-bit and 32-bit integer images are scaled to 8 bits (not clipped to white), float images from [0, 1];
- transparency: laid on white (drawings are ink on white), for every mode with alpha or a transparent palette;
- animation: the first frame.

PIL and numpy only (no torch): Ray Data workers and the service's ingress import it just to read images.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO (multi-lens phone photos)
BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Bytes that are no image of an allowed format, too many pixels, or a broken image; `reason` is one of
    "not an image", "too large", "corrupt image" (the counts a dataset reports)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.detail = reason, message


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB (see the module docstring); ImageDecodeError otherwise."""
    Image.init()  # registers every plugin once: an allow-list naming one not yet loaded would raise KeyError
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            _check_size(image, max_pixels)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image", f"not an image of an allowed format ({', '.join(ALLOWED_FORMATS)})") \
            from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too large", str(error)) from None
    except Exception as error:  # truncated or otherwise broken data: Pillow raises many kinds
        raise ImageDecodeError("corrupt image", f"{type(error).__name__}: {error}") from None


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError("too large", f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.repeat(_scaled(image)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _scaled(image: Image.Image) -> np.ndarray:
    """A single-channel image of more than 8 bits as uint8: 16-bit values / 257, 32-bit integers by their range
    (16-bit PNGs open as mode I), floats from [0, 1]."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = values * 255.0
    elif image.mode.startswith("I;16") or values.max(initial=0) <= 65535:
        values = values / 257.0
    else:
        values = values / 16843009.0  # (2**32 - 1) / 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
