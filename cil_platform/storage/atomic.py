"""Atomic and create-only writes on any fsspec filesystem: a reader sees the old file, the new file, or nothing.

Create-only (`create_only_bytes`) is what makes a store version immutable: the file appears complete or not at
all, and never replaces one that is there. How each backend does it:

- local disk (and `file://`): the bytes go to a temp file (fsync'ed), which is then hard-linked to its name;
  link(2) fails with EEXIST when the name exists, atomically, also between processes and hosts sharing an NFS mount.
  On a filesystem without hard links the file is opened with O_EXCL instead (just as exclusive, but a reader may
  see it before it is complete: the store's manifest then fails to parse and is skipped until it is).
- S3 (s3fs): one PUT with `If-None-Match: *`; the server answers 412 when the key exists (AWS S3 since 2024,
  recent MinIO and Ceph RGW, moto). A HEAD first refuses an existing key on servers that ignore the header.
- anything else (memory://, gcsfs, ...): fsspec's `pipe_file(mode="create")`, which on most backends is an
  existence check followed by a write. That is the documented fallback: two writers racing within the same
  instant may both succeed, and what protects readers then is the manifest's sha256 (a mixed entry is skipped).
"""
from __future__ import annotations

import errno
import os
import tempfile

from fsspec.implementations.local import LocalFileSystem


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _synced_temp(path: str, data: bytes) -> str:
    """A temp file beside `path` holding `data`, fsync'ed and world-readable (the store and cache are read by
    other processes and users); the caller renames or links it into place and removes it on failure."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    """Temp file + fsync + os.replace locally; on object stores a single put is already atomic."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    temp = _synced_temp(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def create_only_bytes(fs, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist (see the module docstring per backend); FileExistsError if it does."""
    if isinstance(fs, LocalFileSystem):
        temp = _synced_temp(path, data)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            _exclusive_write(path, data)
        finally:
            os.unlink(temp)
        return
    if _is_s3(fs):
        fs.invalidate_cache(path)  # a listing cached before another writer's PUT must not hide its key
        if fs.exists(path):
            raise FileExistsError(path)
    fs.pipe_file(path, data, mode="create")


def _exclusive_write(path: str, data: bytes) -> None:
    """O_CREAT | O_EXCL: for filesystems without hard links; FileExistsError when `path` exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def create_entry(fs, directory: str, files: dict[str, bytes], marker_name: str, marker: bytes) -> None:
    """Create an immutable entry: every file create-only, the commit marker `marker_name` last. A file already
    there with the same bytes is kept (a retry, or a writer that died after it, wrote exactly this); one with other
    bytes raises FileExistsError, and so does an existing marker: nothing that is there is ever replaced."""
    for name, data in files.items():
        path = f"{directory}/{name}"
        try:
            create_only_bytes(fs, path, data)
        except FileExistsError:
            if fs.cat_file(path) != data:
                raise FileExistsError(path) from None
    create_only_bytes(fs, f"{directory}/{marker_name}", marker)


def commit_entry(fs, directory: str, files: dict[str, bytes], marker_name: str, marker: bytes) -> None:
    """Write (or rewrite) a mutable entry whose `marker_name` file is its commit marker: the old marker is withdrawn
    first (a reader never pairs it with new files), then every file atomically, the marker last (a writer that dies
    half-way leaves nothing a reader counts as committed). For the run state, which only its lease holder writes."""
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
