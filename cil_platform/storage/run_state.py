"""Resumable runs: after every task the driver persists what the next task needs, so running the same job
again (same output_dir) continues after the last completed task instead of starting over.

Layout, under `<run_url>/run_state/` (the output_dir, or `<storage.url>/<name>`; any fsspec URL):

    task-0002/arrays.safetensors   every numpy array of the components' state (class statistics, replay memory, baselines)
    task-0002/state.json           written last, the commit marker: config hash, the store version and sha256 of
                                   the projection, accuracy rows, throughput, the components' other state (JSON),
                                   the sha256 and size of arrays.safetensors, and the sha256 of the marker itself

Both files are written atomically (atomic.atomic_write_bytes), the marker last, like the projection store. A task
directory without a marker, whose marker is not one of this format (any content: not JSON, another shape, a
sha256 that does not match), or whose arrays do not match the marker's sha256, is never loaded nor trusted: it is
skipped with a warning and the previous complete state is used instead. The two newest complete states are kept.
The projection itself is not copied: it is the store's version of that task, checked against the sha256 recorded here.

`open_run_state` also takes the run's lease (lease.py): one driver per run directory; a second is refused.

Ray Train's own checkpoints live beside it in `<run_url>/ray_train/<config hash>/`: Ray Train restores a fit
from the newest checkpoint it finds under its storage path and run name, so they must never be shared between
configs, and a fit the driver was killed in resumes from its last epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from .atomic import commit_entry, numbered_entries
from . import Storage, join_url, open_storage
from .lease import Lease, acquire_lease
from .store import CorruptEntryError, FileDigest, Manifest, ProjectionStore

log = logging.getLogger(__name__)

STATE_DIR = "run_state"
TASK_PREFIX = "task-"  # run_state/task-0002/
TRAIN_DIR = "ray_train"  # Ray Train's checkpoints, beside the run state (ExperimentConfig.train_storage_url)
ARRAYS_FILE = "arrays.safetensors"
MARKER_FILE = "state.json"
FORMAT = 2  # 2: the marker carries its own sha256 (format-1 markers are skipped: the run starts over)
KEEP = 2  # the newest complete state and one to fall back to
_ARRAY = "__array__"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ConfigMismatchError(ValueError):
    """The output dir holds the state of a run with another config."""


class RunStateError(RuntimeError):
    """A complete run state that cannot be resumed (its projection is missing or changed in the store)."""


class ProjectionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    sha256: str


class Marker(BaseModel):
    """What state.json must hold to be trusted: every field of its format, and a sha256 of the rest of it."""

    model_config = ConfigDict(extra="forbid")

    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    config_hash: str
    task: int = Field(ge=0)
    next_task: int = Field(ge=1)
    projection: ProjectionRef
    rows: dict[str, Any]
    throughput: dict[str, Any]
    components: dict[str, Any]
    arrays: FileDigest
    sha256: str = ""

    def body_digest(self) -> str:
        """sha256 of the marker without its own checksum, in one canonical JSON form (of what was serialised: a
        NaN is written as null, so the digest is taken after that, the same on both sides)."""
        body = json.loads(self.model_dump_json(exclude={"sha256"}))
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def sealed(self) -> bytes:
        return self.model_copy(update={"sha256": self.body_digest()}).model_dump_json().encode()

    @classmethod
    def checked(cls, text: bytes) -> "Marker":
        """The marker in `text`; ValueError naming what is wrong when it is not one this code can trust."""
        try:
            marker = cls.model_validate_json(text)
        except ValidationError as error:
            raise ValueError(f"not a run-state marker of format {FORMAT} ({error.error_count()} problems, first: "
                             f"{error.errors()[0]['msg']})") from None
        if marker.sha256 != marker.body_digest():
            raise ValueError("its sha256 does not match its content")
        return marker


@dataclass
class Resumed:
    next_task: int  # index of the first task still to run
    projection: bytes
    rows: dict
    throughput: dict


class RunState:
    """The persisted progress of the run identified by `run_url`, for one config."""

    def __init__(self, run: Storage, cfg_hash: str, lease: Lease | None = None):
        self.fs, self.config_hash, self.lease = run.fs, cfg_hash, lease
        self.root = join_url(run.path, STATE_DIR)
        self._train_root = join_url(run.path, TRAIN_DIR)

    def release(self) -> None:
        """Give back the run's lease (also done when this object is collected or the process exits)."""
        if self.lease is not None:
            self.lease.release()

    def _dir(self, task: int) -> str:
        return join_url(self.root, f"{TASK_PREFIX}{task:04d}")

    def _tasks(self) -> list[int]:
        """Task indices with a state directory (complete or not), newest first."""
        return numbered_entries(self.fs, self.root, TASK_PREFIX)[::-1]

    def save(self, task: int, projection: Manifest, components: dict[str, Stateful], rows: dict,
             throughput: dict) -> None:
        """Persist the state after `task` completed; its projection must already be in the store."""
        arrays: dict[str, np.ndarray] = {}
        tree = {name: _split(component.state_dict(), arrays, name) for name, component in components.items()}
        blob = save_arrays(arrays)
        marker = Marker(config_hash=self.config_hash, task=task, next_task=task + 1,
                        projection=ProjectionRef(version=projection.version, sha256=projection.sha256),
                        rows=rows, throughput=throughput, components=tree, arrays=FileDigest.of(blob))
        commit_entry(self.fs, self._dir(task), {ARRAYS_FILE: blob}, MARKER_FILE, marker.sealed())
        for old in self._tasks():
            if old > task or old <= task - KEEP:  # newer ones were incomplete: this run replaced them
                self.fs.rm(self._dir(old), recursive=True)

    def _newest_complete(self) -> tuple[Marker, dict[str, np.ndarray]] | None:
        for task in self._tasks():
            try:
                return self._complete(self._dir(task))
            except FileNotFoundError:
                log.warning("run state %s is incomplete; falling back to an earlier one", self._dir(task))
            except ValueError as error:
                log.warning("run state %s is not used: %s; falling back to an earlier one", self._dir(task), error)
        return None

    def _complete(self, directory: str) -> tuple[Marker, dict[str, np.ndarray]]:
        """The marker and arrays of one state directory, each checked against its sha256 (ValueError if not)."""
        marker = Marker.checked(self.fs.cat_file(f"{directory}/{MARKER_FILE}"))
        blob = self.fs.cat_file(f"{directory}/{ARRAYS_FILE}")
        if FileDigest.of(blob) != marker.arrays:
            raise ValueError("its arrays do not match their sha256")
        try:
            return marker, load_arrays(blob)
        except Exception as error:  # safetensors' own errors are not ValueErrors
            raise ValueError(f"its arrays do not load ({error})") from None

    def check_config(self) -> None:
        """ConfigMismatchError if the newest complete state was saved by a run with another config."""
        found = self._newest_complete()
        if found is not None:
            self._check_config(found[0])

    def _check_config(self, marker: Marker) -> None:
        if marker.config_hash != self.config_hash:
            raise ConfigMismatchError(
                f"{self.root} holds the state of a run with another config (hash {marker.config_hash[:12]}, "
                f"this config {self.config_hash[:12]}): start it fresh (jobs/incremental.py --fresh) to discard it, "
                "or give this run another name / output_dir")

    def load(self, store: ProjectionStore, components: dict[str, Stateful]) -> Resumed | None:
        """Load the newest complete state into `components`; None when there is none to resume."""
        found = self._newest_complete()
        if found is None:
            return None
        marker, arrays = found
        self._check_config(marker)
        if set(marker.components) != set(components):
            raise RunStateError(f"{self.root}: saved components {sorted(marker.components)} != {sorted(components)} "
                                "(saved by another version of this code); start fresh (--fresh) to discard it")
        version, sha = marker.projection.version, marker.projection.sha256
        try:
            manifest, weights = store.load(version)
        except (FileNotFoundError, CorruptEntryError) as error:
            raise RunStateError(f"the run state after task {marker.task} needs version {version} of {store.url}: "
                                f"{error}; start fresh (--fresh) to discard the state") from error
        if manifest.sha256 != sha:
            raise RunStateError(f"version {version} of {store.url} is not the projection the run state was saved "
                                f"with (sha256 {manifest.sha256[:12]} != {sha[:12]}); start fresh (--fresh)")
        for name, component in components.items():
            component.load_state_dict(_join(marker.components[name], arrays))
        return Resumed(marker.next_task, weights, marker.rows, marker.throughput)

    def discard(self) -> None:
        """Forget this output dir's progress: the run state and Ray Train's checkpoints (of every config)."""
        for path in (self.root, self._train_root):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)


def _split(value: Any, arrays: dict[str, np.ndarray], key: str) -> Any:
    """A JSON-able copy of a state tree, each numpy array replaced by a reference into `arrays`."""
    if isinstance(value, np.ndarray):
        arrays[key] = np.ascontiguousarray(value)
        return {_ARRAY: key}
    if isinstance(value, dict):
        return {k: _split(v, arrays, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, arrays, f"{key}/{i}") for i, v in enumerate(value)]
    return value


def _join(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[value[_ARRAY]]
        return {k: _join(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, arrays) for v in value]
    return value


def open_run_state(run_url: str, storage_options: dict | None, config_hash: str, fresh: bool = False) -> RunState:
    """The run state under `run_url` for a config of `config_hash`, holding the run's lease (RunLeaseError when
    another driver holds it); `fresh` discards what is there, else another config's state is an error now,
    before any work."""
    storage = open_storage(run_url, storage_options)
    run = RunState(storage, config_hash, acquire_lease(storage))
    try:
        if fresh:
            run.discard()
        else:
            run.check_config()
    except BaseException:
        run.release()
        raise
    return run
