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


def commit_entry(fs, directory: str, files: dict[str, bytes], marker_name: str, marker: bytes) -> None:
    """Write an entry whose `marker_name` file is its commit marker: the old marker is withdrawn first (a reader
    never pairs it with new files), then every file atomically, the marker last (a writer that dies half-way
    leaves nothing a reader counts as committed)."""
    marker_path = f"{directory}/{marker_name}"
    if fs.exists(marker_path):
        fs.rm(marker_path)
    for name, data in files.items():
        atomic_write_bytes(fs, f"{directory}/{name}", data)
    atomic_write_bytes(fs, marker_path, marker)


def numbered_entries(fs, root: str, prefix: str) -> list[int]:
    """The indices N of the `<root>/<prefix>N` entries, ascending, committed or not; a fresh listing every time
    (other processes write there)."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    names = [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)]
    return sorted(int(name[len(prefix):]) for name in names
                  if name.startswith(prefix) and name[len(prefix):].isdigit())
