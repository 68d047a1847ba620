"""What a client may send to `POST /v1/classify`, checked before any model sees it.

Two ways to send an image: the raw bytes with an `image/*` content type, or a multipart form whose
field `file` holds the image. Everything else is a client error with a message, never a 500:

    415  a content type that is neither `image/*` nor `multipart/form-data`, or a non-image file part
    413  a body over `max_bytes` (checked on Content-Length and again while streaming), or an image over
         `max_pixels` (checked from the header, before the pixels are decoded)
    400  an empty body, a multipart form without a `file` field, bytes that are no decodable image

Kept free of Ray and of the model so it can be tested on its own.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from gmm_model.images import ImageDecodeError, decode_rgb

# a multipart body carries boundaries and part headers around the file
MULTIPART_OVERHEAD = 16 * 1024
FILE_FIELD = "file"
ACCEPTED_PART_TYPES = ("application/octet-stream", "")


class InputError(ValueError):
    """A request the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_body(content_type: str | None, content_length: str | None, chunks: AsyncIterator[bytes],
                    max_bytes: int) -> tuple[str, bytes]:
    """Check the content type and size, read the body; returns (kind, bytes), kind 'raw' or 'multipart'."""
    media = media_type(content_type)
    if media.startswith("image/"):
        kind, limit = "raw", max_bytes
    elif media == "multipart/form-data":
        kind, limit = "multipart", max_bytes + MULTIPART_OVERHEAD
    else:
        shown = media or "none"
        raise InputError(415, f"unsupported content type {shown!r}: send the image bytes with an image/* "
                              f"content type, or multipart/form-data with the image in the field {FILE_FIELD!r}")
    body = await read_bounded(content_length, chunks, limit, shown_limit=max_bytes)
    if not body:
        raise InputError(400, "empty body: send an image")
    return kind, body


async def read_bounded(content_length: str | None, chunks: AsyncIterator[bytes], limit: int, *,
                       shown_limit: int | None = None) -> bytes:
    """The body, never more than `limit` bytes of it read: 413 on a larger Content-Length before reading anything,
    and again as soon as a streamed (chunked) body passes the limit. Every body the app reads goes through here."""
    shown = limit if shown_limit is None else shown_limit
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InputError(400, f"invalid Content-Length {content_length!r}") from None
        if declared > limit:
            raise InputError(413, f"body of {declared} bytes exceeds the limit of {shown} bytes")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise InputError(413, f"body exceeds the limit of {shown} bytes")
    return bytes(body)


async def file_from_multipart(headers, body: bytes, max_bytes: int) -> bytes:
    """The bytes of the `file` field of a multipart body (starlette's parser, fed from memory)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    parser = MultiPartParser(headers, stream(), max_files=1, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise InputError(400, f"malformed multipart body: {error.message}") from None
    except Exception as error:  # python-multipart raises its own errors on garbage
        raise InputError(400, f"malformed multipart body: {error}") from None
    try:
        upload = form.get(FILE_FIELD)
        if upload is None or isinstance(upload, str):
            fields = ", ".join(sorted(form.keys())) or "none"
            raise InputError(400, f"multipart body has no file field {FILE_FIELD!r} (fields: {fields})")
        part_type = media_type(upload.content_type)
        if not (part_type.startswith("image/") or part_type in ACCEPTED_PART_TYPES):
            raise InputError(415, f"field {FILE_FIELD!r} has content type {part_type!r}; send an image")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise InputError(413, f"image of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data:
        raise InputError(400, f"field {FILE_FIELD!r} is empty: send an image")
    return data


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB with the training decoder (gmm_model.images: allowed formats, EXIF
    orientation, 16-bit and float scaled, alpha on white, the first frame); a client error otherwise."""
    try:
        return decode_rgb(data, max_pixels)
    except ImageDecodeError as error:
        if error.reason == "too large":
            raise InputError(413, f"image too large: {error.detail}") from None
        raise InputError(400, f"body is not a decodable image ({error.detail})") from None
