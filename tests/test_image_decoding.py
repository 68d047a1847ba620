"""One decoder for training and serving (gmm_model/images.py): each kind of image fed to both paths — the dataset
rows (cil_platform/data/rows.py) and the service's input check (serve/inputs.py) — gives the same pixels or the
same refusal. And the folder listing: regular files only, linked class folders followed, non-UTF-8 names skipped."""
from __future__ import annotations

import io
import os

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cil_platform.data import rows as training
from cil_platform.data.folder import class_files
from cil_platform.data.listing import list_files
from serve.inputs import InputError, decode_image

CAP = 64 * 64  # the pixel cap both paths are given here


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def rgba() -> Image.Image:
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    return Image.fromarray(pixels, "RGBA")


def rotated_jpeg() -> bytes:
    image = Image.fromarray(np.tile(np.arange(0, 240, 20, dtype=np.uint8), (6, 1)), "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(image, "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


IMAGES = {
    "rgba png": encoded(rgba(), "PNG"),
    "la png": encoded(rgba().convert("LA"), "PNG"),
    "palette with transparency": encoded(rgba().convert("P"), "PNG", transparency=0),
    "16-bit grey png": encoded(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"),
    "float tiff": encoded(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F"), "TIFF"),
    "exif-rotated jpeg": rotated_jpeg(),
    "animated gif": animated_gif(),
    "cmyk jpeg": encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"),
}


def train_decode(data: bytes, monkeypatch) -> tuple[np.ndarray, str]:
    """What the dataset loaders make of `data`: the decoded image and the error (reason first)."""
    monkeypatch.setattr(training, "MAX_PIXELS", CAP)
    table = training.decode_contents(["x/img"], [len(data)], [data], pa.chunked_array([["x"]]), 10**8)
    row = table.to_pylist()[0]
    return np.asarray(table.column("image").chunk(0).to_numpy()[0]), row["error"]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_both_paths_decode_each_kind_of_image_to_the_same_pixels(name, monkeypatch):
    trained, error = train_decode(IMAGES[name], monkeypatch)
    served = decode_image(IMAGES[name], CAP)
    assert error == "" and served.dtype == np.uint8 and served.shape[2] == 3
    np.testing.assert_array_equal(trained, served)


def test_what_the_shared_decoder_does_to_each_kind(monkeypatch):
    out = {name: decode_image(data, CAP) for name, data in IMAGES.items()}
    assert (out["rgba png"][6, 0] == 255).all() and tuple(out["rgba png"][0, 0]) == (200, 0, 0)  # alpha on white
    assert (out["la png"][6, 0] == 255).all()
    assert (out["palette with transparency"][6, 0] == 255).all()
    assert (out["16-bit grey png"] == round(40000 / 257)).all()  # scaled, not clipped to white
    assert (out["float tiff"] == 128).all()  # 0.5 of [0, 1]
    assert out["exif-rotated jpeg"].shape == (12, 6, 3)  # displayed upright: 6 wide x 12 high became 12 x 6
    assert tuple(out["animated gif"][0, 0]) == (255, 0, 0)  # the first frame


@pytest.mark.parametrize("data, reason, status", [
    (encoded(Image.new("RGB", (65, 64)), "PNG"), "too large", 413),  # 4160 pixels > 4096, from the header
    (encoded(Image.new("RGB", (4, 4)), "ICO"), "not an image", 400),  # Pillow reads it; not on the allow-list
    (encoded(Image.new("RGB", (4, 4)), "PCX"), "not an image", 400),
    (b"plain text", "not an image", 400),
    (encoded(Image.new("RGB", (32, 32), (9, 9, 9)), "JPEG")[:200], "corrupt image", 400),
])
def test_both_paths_refuse_the_same_images_for_the_same_reason(data, reason, status, monkeypatch):
    _, error = train_decode(data, monkeypatch)
    assert error.startswith(f"{reason}: x/img")
    with pytest.raises(InputError) as refused:
        decode_image(data, CAP)
    assert refused.value.status == status


def test_the_pixel_cap_is_checked_before_decoding(monkeypatch):
    """A 9000 x 9000 PNG of a few kilobytes (a decompression bomb) is refused without allocating its pixels."""
    bomb = encoded(Image.new("1", (9000, 9000)), "PNG")
    assert len(bomb) < 100_000
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    assert train_decode(bomb, monkeypatch)[1].startswith("too large")
    with pytest.raises(InputError, match="exceeds the limit"):
        decode_image(bomb, CAP)


@pytest.fixture
def odd_folder(tmp_path):
    """A class folder linked in from elsewhere, a pipe, a link to a device, a name that is not UTF-8."""
    elsewhere = tmp_path / "elsewhere" / "cat"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.png").write_bytes(IMAGES["rgba png"])
    root = tmp_path / "data"
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "b.png").write_bytes(IMAGES["rgba png"])
    os.symlink(elsewhere, root / "cat")
    os.mkfifo(root / "dog" / "pipe.png")  # reading it would block the run
    os.symlink("/dev/zero", root / "dog" / "zero.png")  # reading it would never end
    os.symlink(root / "dog", root / "dog" / "loop")  # a link back up: followed once, never in a loop
    with open(os.path.join(os.fsencode(root / "dog"), b"\xff.png"), "wb") as handle:
        handle.write(IMAGES["rgba png"])
    return str(root)


def test_the_listing_takes_regular_files_follows_linked_class_folders_and_skips_odd_names(odd_folder, caplog):
    fs = fsspec.filesystem("file")
    with caplog.at_level("WARNING"):
        files = list_files(fs, odd_folder)
    assert sorted(files) == ["cat/a.png", "dog/b.png", "dog/loop/b.png"]
    assert "not a regular file" in caplog.text and "name is not UTF-8" in caplog.text
    by_class = class_files(fs, odd_folder, "", files)
    assert sorted(by_class) == ["cat", "dog"] and [rel for rel, _ in by_class["cat"]] == ["cat/a.png"]
