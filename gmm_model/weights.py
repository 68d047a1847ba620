"""Where weight files come from, and short ids that change when they do.

Identities of encoders and caches must change whenever the weights change. Hashing multi-GB files on
every load is too slow, so a file is named by its resolved path, size and modification time: any
rewrite changes the id (a copy to another machine does too, which only costs a recomputation).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def files_signature(paths: list[str | Path], length: int = 12) -> str:
    """`length` hex digits over (resolved path, size, mtime) of every file."""
    parts = []
    for path in paths:
        file = Path(path)
        stat = file.stat()
        parts.append(f"{file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:length]


def weights_id(weights: str | None) -> str:
    """How an identity names `weights`: a local file by name and signature, anything else (a pretrained
    tag such as 'openai') as written, None as the library's default."""
    if weights is None:
        return "default"
    path = Path(weights).expanduser()
    if path.is_file():
        return f"{path.name}:{files_signature([path])}"
    return weights


def local_weights_file(weights: str, what: str) -> str:
    """`weights` as an existing file path, or a clear error naming `what` wanted it."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: weights file {weights!r} does not exist")
    return str(path)


def fetch(location: str, filename: str, required: bool = True) -> str | None:
    """`filename` inside a local directory or a Hugging Face hub repository (downloaded into the hub cache).

    Not required and absent: None. Required and absent, or the hub unreachable: a ValueError.
    """
    if Path(location).expanduser().is_dir():
        path = Path(location).expanduser() / filename
        if path.is_file():
            return str(path)
        if required:
            raise ValueError(f"{location!r} has no {filename}")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(location, filename)
    except Exception as error:  # not in the repository, offline and not cached, unknown or gated repository
        if isinstance(error, EntryNotFoundError) and not required:
            return None
        raise ValueError(f"cannot fetch {filename} of {location!r} (a local directory or hub name): {error}") from error
