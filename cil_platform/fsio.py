"""Atomic writes on any fsspec filesystem: a reader sees the old file, the new file, or nothing."""
from __future__ import annotations

import os
import tempfile

from fsspec.implementations.local import LocalFileSystem


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    """Temp file + fsync + os.replace locally; on object stores a single put is already atomic."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600; the store and cache are read by other processes/users
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
