"""One driver per run: a lease file in the run's directory, created create-only, so a second driver on the same
output dir (or `<storage.url>/<name>`) is refused before it does any work instead of interleaving its tasks,
run states and store versions with the first one's.

`<run_url>/driver.lease` is JSON {host, pid_namespace, pid, started, token, since}. It is created with
atomic.create_only_bytes (a hard link locally, `If-None-Match: *` on S3) and removed when the holder lets it go
(`Lease.release`, which also runs when the lease is garbage collected or the interpreter exits).

- A lease left by a killed driver is taken over when it names this host (and pid namespace) and a process that
  no longer runs, or another process under the same pid (its start time differs).
- One held on another host cannot be checked from here: it is refused with a message that names it; delete the
  file if that driver is known to be gone. An unreadable lease file is refused the same way.
- The process that holds a lease may open it again (the command line checks the run before Ray starts, then the
  experiment opens it): that takes it over with a new token, so the earlier holder's release leaves it alone.

Not covered: two drivers taking over the same stale lease in the same instant (both may win; the store's
create-only versions still keep them from overwriting each other).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone

from . import Storage, join_url
from .atomic import atomic_write_bytes, create_only_bytes

log = logging.getLogger(__name__)

LEASE_FILE = "driver.lease"


class RunLeaseError(OSError):
    """Another driver holds the run's lease (an OSError: the run dir is busy, as a file can be)."""


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (Linux; [] elsewhere or when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_started(pid: int) -> str | None:
    """The start time of process `pid`, in clock ticks since boot: tells a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> str:
    """Which pid namespace this process sees (containers on one host may share a host name, not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` of this host runs (a zombie does not) and is the one that was started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":
        return False
    now = fields[19] if len(fields) > 19 else None
    return started is None or now is None or now == started


def _release(fs, path: str, token: str) -> None:
    """Remove the lease file if it is still this token's (a taken-over lease belongs to its new holder)."""
    try:
        fs.invalidate_cache()
        if json.loads(fs.cat_file(path)).get("token") == token:
            fs.rm(path)
    except FileNotFoundError:
        pass
    except Exception as error:  # at interpreter exit the storage may be gone: never fail the exit for it
        log.warning("could not release the run lease %s: %s", path, error)


@dataclass
class Lease:
    """The lease this process holds on a run directory; `release()` gives it back."""

    fs: object
    path: str
    holder: dict

    def __post_init__(self):
        self._finalizer = weakref.finalize(self, _release, self.fs, self.path, self.holder["token"])

    def release(self) -> None:
        self._finalizer()


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid_namespace": _pid_namespace(), "pid": pid,
            "started": _process_started(pid), "token": uuid.uuid4().hex,
            "since": datetime.now(timezone.utc).isoformat()}


def _read(fs, path: str) -> dict | None:
    """The holder recorded in the lease file; {} when it is unreadable (treated as held), None when there is none."""
    try:
        fs.invalidate_cache()
        holder = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _ours_or_stale(holder: dict, me: dict) -> str | None:
    """Why a lease may be taken over ("ours", "stale"), or None when its holder may still be running."""
    same_host = holder.get("host") == me["host"] and holder.get("pid_namespace") == me["pid_namespace"]
    if not same_host or not isinstance(holder.get("pid"), int):
        return None
    if holder["pid"] == me["pid"] and holder.get("started") == me["started"]:
        return "ours"
    return None if _alive(holder["pid"], holder.get("started")) else "stale"


def acquire_lease(run: Storage) -> Lease:
    """Hold the lease on `run` (its directory), or RunLeaseError naming the driver that holds it."""
    path, me = join_url(run.path, LEASE_FILE), _holder()
    if run.is_local:
        os.makedirs(run.path, exist_ok=True)
    blob = json.dumps(me).encode()
    try:
        create_only_bytes(run.fs, path, blob)
        return Lease(run.fs, path, me)
    except FileExistsError:
        pass
    holder = _read(run.fs, path)
    reason = _ours_or_stale(holder, me) if holder is not None else "stale"
    if reason is None:
        raise RunLeaseError(
            f"{run.url} is in use by another driver (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}; lease {run.url.rstrip('/')}/{LEASE_FILE}): wait for it to finish, "
            "or give this run another name / output_dir. If that driver is gone (its host was lost), delete the "
            "lease file and start again")
    if reason == "stale":
        log.warning("taking over the lease of %s from pid %s on %s, which no longer runs", run.url,
                    holder.get("pid") if holder else "?", me["host"])
    atomic_write_bytes(run.fs, path, blob)
    return Lease(run.fs, path, me)
