"""The projection store: one versioned entry per task on any fsspec URL (local, file://, s3://, memory://).

Layout: `<url>/v0003/projection.safetensors` then `<url>/v0003/manifest.json`. The manifest is written
last and is the commit marker: a version exists only once its manifest does, so a writer that dies
half-way leaves nothing a reader can see. The manifest carries the sha256 and size of the weights,
so a reader can tell a torn or tampered entry from a good one instead of serving garbage.
"""
from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .fsio import atomic_write_bytes
from .storage import open_storage

WEIGHTS_FILE = "projection.safetensors"
MANIFEST_FILE = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d+)$")


class CorruptEntryError(ValueError):
    """A store entry whose manifest does not parse or whose weights do not match their manifest."""


class Manifest(BaseModel):
    """What a version is: which task produced it, which classes it knows, and how to check its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=0)
    task: int = Field(ge=0)
    seen_classes: list[str]
    stack_fingerprint: str
    sha256: str
    size: int = Field(ge=0)
    created_at: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise CorruptEntryError(f"manifest does not parse: {error}") from error


class ProjectionStore:
    """Versioned projections for one experiment; version number == task index."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        storage = open_storage(url, storage_options)
        self.fs, self.root = storage.fs, storage.path.rstrip("/")

    def __repr__(self) -> str:
        return f"ProjectionStore({self.url!r})"

    def _path(self, version: int, name: str) -> str:
        return f"{self.root}/v{version:04d}/{name}"

    def _write(self, path: str, data: bytes) -> None:
        atomic_write_bytes(self.fs, path, data)

    def publish(self, task: int, weights: bytes, seen_classes: list[str], stack_fingerprint: str,
                extra: dict | None = None) -> Manifest:
        """Write task's weights, then its manifest. Re-publishing a version first withdraws the old
        manifest, so no reader ever pairs the old manifest with the new weights unnoticed."""
        manifest = Manifest(
            version=task, task=task, seen_classes=list(seen_classes), stack_fingerprint=stack_fingerprint,
            sha256=hashlib.sha256(weights).hexdigest(), size=len(weights),
            created_at=datetime.now(timezone.utc).isoformat(), metrics={}, extra=dict(extra or {}),
        )
        manifest_path = self._path(task, MANIFEST_FILE)
        if self.fs.exists(manifest_path):
            self.fs.rm(manifest_path)
        self._write(self._path(task, WEIGHTS_FILE), bytes(weights))
        self._write(manifest_path, manifest.to_json().encode())
        return manifest

    def versions(self) -> list[int]:
        """Committed versions, ascending. Entries without a manifest, or whose manifest does not parse,
        are skipped: a half-written or damaged entry must not stop readers from using the good ones."""
        self.fs.invalidate_cache()  # other processes publish; never answer from a stale listing
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            match = _VERSION_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match is None:
                continue
            try:
                self.manifest(int(match.group(1)))
            except (FileNotFoundError, CorruptEntryError):
                continue
            found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Manifest | None:
        versions = self.versions()
        return self.manifest(versions[-1]) if versions else None

    def manifest(self, version: int) -> Manifest:
        """The manifest of a version; FileNotFoundError if uncommitted, CorruptEntryError if damaged."""
        try:
            text = self.fs.cat_file(self._path(version, MANIFEST_FILE))
        except FileNotFoundError:
            raise FileNotFoundError(f"no committed version {version} in {self.url}") from None
        manifest = Manifest.from_json(text)
        if manifest.version != version:
            raise CorruptEntryError(f"manifest in v{version:04d} claims version {manifest.version}")
        return manifest

    def load(self, version: int) -> tuple[Manifest, bytes]:
        """Manifest and weights of a version, with the weights checked against the manifest."""
        manifest = self.manifest(version)
        try:
            weights = self.fs.cat_file(self._path(version, WEIGHTS_FILE))
        except FileNotFoundError:
            raise CorruptEntryError(f"version {version} has a manifest but no weights") from None
        if len(weights) != manifest.size:
            raise CorruptEntryError(f"version {version}: weights are {len(weights)} bytes, "
                                    f"manifest says {manifest.size}")
        digest = hashlib.sha256(weights).hexdigest()
        if digest != manifest.sha256:
            raise CorruptEntryError(f"version {version}: weights sha256 {digest} != manifest {manifest.sha256}")
        return manifest, weights

    def annotate(self, version: int, metrics: dict) -> Manifest:
        """Merge metrics into a committed version's manifest (atomic rewrite; weights untouched)."""
        current = self.manifest(version)
        updated = current.model_copy(update={"metrics": {**current.metrics, **metrics}})
        updated = Manifest.model_validate(updated.model_dump())  # model_copy skips validation
        self._write(self._path(version, MANIFEST_FILE), updated.to_json().encode())
        return updated
