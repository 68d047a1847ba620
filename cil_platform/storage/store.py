"""The projection store: one versioned entry per task on any fsspec URL (local, file://, s3://, memory://).

Layout: `<url>/v0003/projection.safetensors`, `<url>/v0003/class_stats.safetensors` (the class statistics the
version's decoding rule needs, e.g. the first-token prior and the prototypes), then `<url>/v0003/manifest.json`.
A version is published once, after its evaluation, with its metrics and the rule they were measured with: what
a reader sees is complete. The manifest is written last and is the commit marker: a version exists only once its
manifest does, so a writer that dies half-way leaves nothing a reader can see. The manifest carries the sha256
and size of every file, so a reader can tell a torn or tampered entry from a good one instead of serving garbage.

Versions are immutable: every file of a version is created create-only (atomic.create_only_bytes: a hard link
locally, `If-None-Match: *` on S3), so a second publisher of a version that holds other content fails with
VersionExistsError and changes nothing. Publishing exactly the same content again (a driver resumed after it
died between publishing and checkpointing retrains deterministically) returns the version that is there.
"""
from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .atomic import create_entry, numbered_entries
from . import open_storage

log = logging.getLogger(__name__)

WEIGHTS_FILE = "projection.safetensors"
CLASS_STATS_FILE = "class_stats.safetensors"
MANIFEST_FILE = "manifest.json"
VERSION_PREFIX = "v"  # v0003/


class CorruptEntryError(ValueError):
    """A store entry whose manifest does not parse or whose weights do not match their manifest."""


class VersionExistsError(FileExistsError):
    """A version that is already in the store (or being written) with other content: versions are immutable."""


class FileDigest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    size: int = Field(ge=0)

    @classmethod
    def of(cls, data: bytes) -> "FileDigest":
        return cls(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


class Manifest(BaseModel):
    """What a version is: which task produced it, which classes it knows, the decoding rule it was measured with
    (and is served with), and how to check its files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=0)
    task: int = Field(ge=0)
    seen_classes: list[str]
    stack_fingerprint: str
    sha256: str
    size: int = Field(ge=0)
    created_at: str
    rule: str = Field("trie", description="the decoding rule (gmm_model.classify.Rule) its metrics were measured with")
    class_stats: FileDigest | None = Field(None, description="the class statistics the rule needs, if any")
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def same_content(self, other: "Manifest") -> bool:
        """Whether two manifests describe the same version content (when and with what metrics it was written aside)."""
        content = ("version", "task", "seen_classes", "stack_fingerprint", "sha256", "size", "rule", "class_stats")
        return all(getattr(self, name) == getattr(other, name) for name in content)

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

    def _dir(self, version: int) -> str:
        return f"{self.root}/{VERSION_PREFIX}{version:04d}"

    def _path(self, version: int, name: str) -> str:
        return f"{self._dir(version)}/{name}"

    def publish(self, task: int, weights: bytes, seen_classes: list[str], stack_fingerprint: str, rule: str = "trie",
                class_stats: bytes | None = None, metrics: dict | None = None, extra: dict | None = None) -> Manifest:
        """Create version `task`: its files, then its manifest, each create-only. The same content published
        again returns the version there; other content raises VersionExistsError (nothing is overwritten)."""
        weights = bytes(weights)
        manifest = Manifest(
            version=task, task=task, seen_classes=list(seen_classes), stack_fingerprint=stack_fingerprint,
            sha256=hashlib.sha256(weights).hexdigest(), size=len(weights),
            created_at=datetime.now(timezone.utc).isoformat(), rule=rule,
            class_stats=FileDigest.of(class_stats) if class_stats is not None else None,
            metrics=dict(metrics or {}), extra=dict(extra or {}),
        )
        files = {WEIGHTS_FILE: weights, **({CLASS_STATS_FILE: bytes(class_stats)} if class_stats is not None else {})}
        try:
            create_entry(self.fs, self._dir(task), files, MANIFEST_FILE, manifest.to_json().encode())
        except FileExistsError as error:
            return self._already_published(manifest, error)
        return manifest

    def _already_published(self, ours: Manifest, error: FileExistsError) -> Manifest:
        """The version in the store if it is `ours` in content, else VersionExistsError saying what is there."""
        where = f"version {ours.version} of {self.url}"
        try:
            there = self.manifest(ours.version)
        except FileNotFoundError:
            raise VersionExistsError(
                f"{where} is being written by another publisher, or one died half-way ({error} holds other "
                f"bytes): versions are create-only. If no other driver writes to this store, remove "
                f"{self._dir(ours.version)} and publish again; else give this run its own store_url") from None
        except CorruptEntryError as damaged:
            raise VersionExistsError(f"{where} exists but is damaged ({damaged}); it is never overwritten: "
                                     f"remove {self._dir(ours.version)} to publish it again") from None
        if not there.same_content(ours):
            raise VersionExistsError(
                f"{where} was already published (at {there.created_at}, sha256 {there.sha256[:12]}, "
                f"{len(there.seen_classes)} classes) with other content than this one (sha256 {ours.sha256[:12]}): "
                "versions are immutable. Another driver publishes to the same store: give each run its own "
                "store_url (or name), or start over in a new one") from None
        log.info("%s is already in the store with the same content; not written again", where)
        return there

    def versions(self) -> list[int]:
        """Committed versions, ascending. Entries without a manifest, whose manifest does not parse, or whose files
        are missing or of another size than it says, are skipped: a half-written or damaged entry must not stop
        readers from using the good ones (load() also checks every byte against the sha256)."""
        found = []
        for version in numbered_entries(self.fs, self.root, VERSION_PREFIX):
            try:
                self._check_sizes(self.manifest(version))
            except FileNotFoundError:
                continue
            except CorruptEntryError as error:
                log.warning("skipping store version %s of %s: %s", version, self.url, error)
                continue
            found.append(version)
        return found

    def latest(self) -> Manifest | None:
        versions = self.versions()
        return self.manifest(versions[-1]) if versions else None

    def newest_good(self) -> tuple[Manifest, bytes] | None:
        """Manifest and weights of the newest version whose every file matches its sha256, falling back past
        damaged ones (each skipped with a warning); None when no version is good."""
        for version in reversed(self.versions()):
            try:
                manifest, weights = self.load(version)
                self.class_stats(manifest)
            except (FileNotFoundError, CorruptEntryError) as error:
                log.warning("store %s: version %s fails its checks (%s); falling back to an older one",
                            self.url, version, error)
                continue
            return manifest, weights
        return None

    def _check_sizes(self, manifest: Manifest) -> None:
        """CorruptEntryError unless every file the manifest names is there with its size (one listing)."""
        sizes = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size")
                 for info in self.fs.ls(self._dir(manifest.version), detail=True)}
        expected = {WEIGHTS_FILE: manifest.size,
                    **({CLASS_STATS_FILE: manifest.class_stats.size} if manifest.class_stats else {})}
        for name, size in expected.items():
            if sizes.get(name) != size:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes"
                raise CorruptEntryError(f"version {manifest.version}: {name} is {found}, manifest says {size} bytes")

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
        return manifest, self._checked(manifest, WEIGHTS_FILE, FileDigest(sha256=manifest.sha256, size=manifest.size))

    def class_stats(self, manifest: Manifest) -> bytes | None:
        """The version's class statistics (checked against its manifest), None when its rule needs none."""
        if manifest.class_stats is None:
            return None
        return self._checked(manifest, CLASS_STATS_FILE, manifest.class_stats)

    def _checked(self, manifest: Manifest, name: str, digest: FileDigest) -> bytes:
        version = manifest.version
        try:
            data = self.fs.cat_file(self._path(version, name))
        except FileNotFoundError:
            raise CorruptEntryError(f"version {version} has a manifest but no {name}") from None
        if len(data) != digest.size:
            raise CorruptEntryError(f"version {version}: {name} is {len(data)} bytes, manifest says {digest.size}")
        found = hashlib.sha256(data).hexdigest()
        if found != digest.sha256:
            raise CorruptEntryError(f"version {version}: {name} sha256 {found} != manifest {digest.sha256}")
        return data
