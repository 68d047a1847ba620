"""Where bytes live: one function turns (URL, storage options) into the filesystems every module uses.

A run writes its projection store, its Ray Train checkpoints and its feature cache either to local
disk (the default: `runs/<name>/...` and `~/.cache/gmm-cil/features`) or under one URL such as
`s3://bucket/prefix`, with one set of fsspec options (endpoint_url, key, secret, ...). Datasets name
their own URL and options (they are often in another bucket or account). Every one of those goes
through `open_storage`, so credentials and endpoints are handled in exactly one place: fsspec for
our own reads and writes, and pyarrow (which Ray Data and Ray Train take) wrapped around the very
same fsspec filesystem instead of a second, separately configured client.

atomic.py (atomic writes, committed entries, numbered listings), store.py (the projection store), run_state.py
(the resumable state of a run) build on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """Where a run's artifacts live (projection store, Ray Train checkpoints, feature cache)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default_factory=lambda: os.environ.get("GMM_CIL_STORAGE_URL") or None,
                            description="e.g. s3://bucket/gmm-cil (default $GMM_CIL_STORAGE_URL, which "
                                        "cluster.yaml sets on every node); None: local disk (output_dir, cache_dir)")
    options: dict[str, Any] = Field(default_factory=dict, repr=False,
                                    description="fsspec options for url, e.g. {client_kwargs: {endpoint_url: ...}}")


@dataclass(frozen=True)
class Storage:
    """A URL resolved once: its fsspec filesystem, its path inside it, and the pyarrow view of both."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str  # no protocol; local paths are absolute

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def arrow(self) -> pyarrow.fs.FileSystem:
        """The pyarrow filesystem for Ray Data and Ray Train; `path` is valid on it."""
        if self.is_local:
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def ray_train_storage(self) -> dict[str, Any]:
        """`RunConfig(**storage.ray_train_storage())`: local disk exactly as Ray Train does it by default,
        anything else through our filesystem (Ray would otherwise build its own S3 client from the URL,
        without our endpoint and credentials)."""
        if self.is_local:
            return {"storage_path": self.path, "storage_filesystem": None}
        return {"storage_path": self.path, "storage_filesystem": self.arrow}


def open_storage(url: str, options: dict[str, Any] | None = None) -> Storage:
    """Resolve `url` (local path, file://, s3://, gs://, memory://, http(s)://) with fsspec `options`."""
    if not url:
        raise ValueError("a storage URL or path is required")
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if not isinstance(fs, LocalFileSystem):
        path = path.rstrip("/") or path
    return Storage(url=url, fs=fs, path=path)


def join_url(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (no os.path: it would mangle `s3://`)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
