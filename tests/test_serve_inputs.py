"""Request checking of the serving API, without Ray: content types, sizes, multipart, image decoding."""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers

from serve.inputs import InputError, decode_image, file_from_multipart, read_body, read_bounded


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


async def chunks(*parts: bytes):
    for part in parts:
        yield part


def read(content_type, body: bytes, max_bytes=1000, content_length="auto"):
    length = str(len(body)) if content_length == "auto" else content_length
    return asyncio.run(read_body(content_type, length, chunks(body[:3], body[3:]), max_bytes))


def multipart(fields: list[tuple[str, str | None, str | None, bytes]]) -> tuple[Headers, bytes]:
    """fields: (name, filename, content type, data)."""
    boundary = "testboundary123"
    body = b""
    for name, filename, ctype, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            body += f"Content-Type: {ctype}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Headers({"content-type": f"multipart/form-data; boundary={boundary}"}), body


def status_of(call) -> int:
    with pytest.raises(InputError) as caught:
        call()
    assert caught.value.message
    return caught.value.status


def test_raw_image_body_is_read_whole():
    assert read("image/png", b"0123456789") == ("raw", b"0123456789")
    assert read("IMAGE/JPEG; charset=binary", b"xyz")[0] == "raw"
    assert read("multipart/form-data; boundary=x", b"abc")[0] == "multipart"


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/octet-stream", None, ""])
def test_other_content_types_are_415(ctype):
    assert status_of(lambda: read(ctype, b"abc")) == 415


def test_size_limits_on_declared_and_streamed_length():
    assert status_of(lambda: read("image/png", b"x" * 1001)) == 413  # declared
    assert status_of(lambda: read("image/png", b"x" * 1001, content_length=None)) == 413  # streamed (chunked)
    assert status_of(lambda: read("image/png", b"x" * 10, content_length="5000")) == 413  # a lying header
    assert status_of(lambda: read("image/png", b"x", content_length="a lot")) == 400
    assert read("image/png", b"x" * 1000)[1] == b"x" * 1000  # the limit itself is fine


def test_a_bounded_read_stops_at_the_limit():
    """Every body the app reads (an image, a reload request) is read through read_bounded: a declared length over
    the limit reads nothing, and a streamed body is read no further than one chunk past the limit."""
    consumed = []

    async def endless(chunk: bytes = b"x" * 1024):
        while True:
            consumed.append(len(chunk))
            yield chunk

    def bounded(content_length, limit=4096):
        return asyncio.run(read_bounded(content_length, endless(), limit))

    assert status_of(lambda: bounded("10000000")) == 413 and consumed == []
    assert status_of(lambda: bounded(None)) == 413 and sum(consumed) == 5 * 1024
    assert asyncio.run(read_bounded("3", chunks(b"ab", b"c"), 4096)) == b"abc"
    assert asyncio.run(read_bounded(None, chunks(), 4096)) == b""


def test_empty_body_is_400():
    assert status_of(lambda: read("image/png", b"")) == 400


def test_multipart_file_field():
    image = png(np.zeros((4, 4, 3), np.uint8))
    headers, body = multipart([("note", None, None, b"hi"), ("file", "a.png", "image/png", image)])
    assert asyncio.run(file_from_multipart(headers, body, 10_000)) == image
    headers, body = multipart([("file", "a.bin", "application/octet-stream", image)])
    assert asyncio.run(file_from_multipart(headers, body, 10_000)) == image


@pytest.mark.parametrize("fields, status", [
    ([("image", "a.png", "image/png", b"data")], 400),  # no field named file
    ([("file", None, None, b"just text")], 400),  # a plain form field, not a file
    ([("file", "a.txt", "text/plain", b"text")], 415),
    ([("file", "a.png", "image/png", b"")], 400),
    ([("file", "a.png", "image/png", b"x" * 101)], 413),
])
def test_multipart_errors(fields, status):
    headers, body = multipart(fields)
    assert status_of(lambda: asyncio.run(file_from_multipart(headers, body, 100))) == status


def test_malformed_multipart_is_400():
    headers = Headers({"content-type": "multipart/form-data"})  # no boundary
    assert status_of(lambda: asyncio.run(file_from_multipart(headers, b"--x\r\n", 100))) == 400


def test_decode_image_gives_rgb_uint8():
    grey = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = decode_image(png(grey, "L"), 10_000)
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    assert (out[..., 0] == grey).all() and (out[..., 2] == grey).all()


def test_transparent_pixels_become_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # one opaque black pixel, the rest transparent black
    out = decode_image(png(rgba, "RGBA"), 100)
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_bad_images():
    good = png(np.zeros((30, 30, 3), np.uint8))
    assert status_of(lambda: decode_image(b"not an image at all", 10_000)) == 400
    assert status_of(lambda: decode_image(good[: len(good) // 2], 10_000)) == 400  # truncated
    assert status_of(lambda: decode_image(good, 899)) == 413  # 900 pixels > 899
    assert decode_image(good, 900).shape == (30, 30, 3)
