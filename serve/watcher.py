"""The Watcher deployment (one replica, no CPU): moves the application to a new version, on its own when the
store gets a newer one (polling), or when told (`announce`). Either way through `deploy.set_served_version`, i.e.
Serve's user_config (the version, its weights' sha256 and the next generation), so every Captioner and Matcher
replica reconfigures in place. Each Captioner replica then reports what it serves (`report`); a move settles once
every running Captioner replica serves the new version's weights, and otherwise names the replicas that did not.
A move that no replica could load is undone (the previous version again, as a newer generation), so replicas that
autoscaling starts later do not try it either.

It checks a version before moving to it (`captioner.read_version`: both files against their manifest's size and
sha256, and the stack fingerprint) without loading any model: this replica never imports torch. When the store's
newest version is damaged it falls back to the newest good one (`ProjectionStore.newest_good`).
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from . import deploy
from .settings import WatcherConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Watcher", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class Watcher:
    def __init__(self, store_url: str, storage_options: dict, stack_fingerprint: str):
        from cil_platform.storage.store import ProjectionStore

        self.store = ProjectionStore(store_url, storage_options)
        self.fingerprint = stack_fingerprint
        self.app_name = serve.get_replica_context().app_name
        self.config = WatcherConfig()
        self.lock = asyncio.Lock()  # one move at a time
        self.refused: set[tuple[int, str]] = set()  # (version, created_at) already found unusable
        # the highest version served or announced so far: polling moves only beyond it, so an announced
        # roll-back stays until a newer version is published
        self.high_water: int | None = None
        self.listing: tuple[int, ...] = ()  # the store's versions at the last poll that looked at them
        self.reports: dict[str, dict] = {}  # Captioner replica id -> its latest report (Captioner._report)
        self.declarative_warned = False
        self.task: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.config = WatcherConfig.model_validate(user_config or {})
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def report(self, replica: str, report: dict) -> None:
        """A Captioner replica says which generation it was told and what it serves (and why not, if it failed)."""
        known = self.reports.get(replica)
        if known is None or report["generation"] >= known["generation"]:
            self.reports[replica] = report

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                logger.exception("polling the projection store failed; trying again in %.1fs",
                                 self.config.poll_interval_s)
            await asyncio.sleep(self.config.poll_interval_s)

    def _check(self, version: int):
        """The manifest of a version fit to serve; raises LookupError / ValueError otherwise."""
        from .captioner import read_version

        return read_version(self.store, version, self.fingerprint).manifest

    async def poll_once(self) -> int | None:
        """Move to the store's newest good version if it is newer than anything served or announced (and, at
        start, pin the version the replicas chose themselves); returns the version moved to. A store listing
        already looked at is not looked at again."""
        if await asyncio.to_thread(deploy.app_status, self.app_name) != "RUNNING":
            return None  # deploying or updating: look again next round
        served = await asyncio.to_thread(deploy.served_version, self.app_name)
        if served is not None and not self.config.follow_latest:
            return None
        listing = tuple(await asyncio.to_thread(self.store.versions))
        if not listing or listing == self.listing:
            return None
        async with self.lock:
            self.listing = listing
            self._raise_high_water(await asyncio.to_thread(deploy.served_version, self.app_name))
            if self.high_water is not None and listing[-1] <= self.high_water:
                return None
            good = await asyncio.to_thread(self.store.newest_good)
            if good is None or good[0].version != listing[-1]:
                logger.error("store version %s fails its checks; %s", listing[-1],
                             "no good version to fall back to" if good is None else
                             f"falling back to version {good[0].version}")
            if good is None or (self.high_water is not None and good[0].version <= self.high_water) or (
                    good[0].version, good[0].created_at) in self.refused:
                return None
            version = good[0].version
            try:
                manifest = await asyncio.to_thread(self._check, version)
            except (LookupError, ValueError) as error:
                self.refused.add((version, good[0].created_at))
                logger.error("not serving store version %s: %s", version, error)
                return None
            result = await self._move(manifest, wait=True)
            if result["status"] != 200:
                return None
            logger.info("store has version %s: moved %s from version %s (generation %s, settled %s)", version,
                        self.app_name, result["previous"], result["generation"], result["settled"])
            return version

    def _raise_high_water(self, version: int | None) -> None:
        if version is not None and (self.high_water is None or version > self.high_water):
            self.high_water = version

    async def announce(self, version: int | None = None, wait: bool = True) -> dict:
        """Serve `version` (None: the store's newest good one). Returns a JSON-able result; `status` is an HTTP
        code."""
        async with self.lock:
            if version is None:
                good = await asyncio.to_thread(self.store.newest_good)
                if good is None:
                    return {"status": 404, "detail": f"projection store {self.store.url} has no good version"}
                version = good[0].version
            try:
                manifest = await asyncio.to_thread(self._check, version)
            except LookupError as error:
                return {"status": 404, "detail": str(error)}
            except ValueError as error:
                return {"status": 409, "detail": str(error)}
            result = await self._move(manifest, wait)
            logger.info("announced version %s: %s", version, result)
            return result

    async def _move(self, manifest, wait: bool) -> dict:
        """Move the app to `manifest`'s version; with `wait`, until every Captioner replica serves it (or says why
        not). Called under the lock."""
        previous = await asyncio.to_thread(deploy.served_config, self.app_name)
        try:
            generation = await asyncio.to_thread(deploy.set_served_version, self.app_name, manifest.version,
                                                 manifest.sha256)
        except deploy.NotDeclarativeError as error:
            if not self.declarative_warned:
                logger.error("%s", error)
                self.declarative_warned = True
            return {"status": 409, "detail": str(error)}
        self._raise_high_water(previous.get("version"))
        self._raise_high_water(manifest.version)
        result = {"status": 200, "version": manifest.version, "sha256": manifest.sha256, "generation": generation,
                  "task": manifest.task, "rule": manifest.rule, "previous": previous.get("version"),
                  "settled": False, "replicas": [], "failed": []}
        if not wait:
            return result  # settled: false, not waited for
        replicas, failed = await self._settle(generation, manifest)
        result.update(settled=bool(replicas) and not failed, replicas=replicas, failed=failed)
        if failed and len(failed) == len(replicas) and previous.get("version") is not None:
            # no replica could load it: move back, so that replicas started later do not try it either
            await asyncio.to_thread(deploy.set_served_version, self.app_name, previous["version"],
                                    previous.get("sha256"))
            await asyncio.to_thread(deploy.wait_running, self.app_name, self.config.settle_timeout_s)
            self.refused.add((manifest.version, manifest.created_at))
            why = "; ".join(f"replica {f['replica']}: {f['error']}" for f in failed)
            logger.error("no Captioner replica could load version %s (%s); back on version %s", manifest.version,
                         why, previous["version"])
            return {"status": 409, "failed": failed,
                    "detail": f"no Captioner replica could load version {manifest.version} ({why}); still serving "
                              f"version {previous['version']}"}
        return result

    async def _settle(self, generation: int, manifest) -> tuple[list[str], list[dict]]:
        """Wait until every running Captioner replica has reported `generation`; returns (replica ids, failed:
        [{"replica", "error"}] for those that do not serve the new weights, or did not report in time)."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        while True:
            running = await asyncio.to_thread(deploy.app_status, self.app_name) == "RUNNING"
            replicas = await asyncio.to_thread(deploy.running_replicas, self.app_name)
            reports = {r: self.reports.get(r) for r in replicas}
            done = all(rep is not None and rep["generation"] >= generation for rep in reports.values())
            timed_out = time.monotonic() > deadline
            if (running and replicas and done) or timed_out:
                failed = [{"replica": r, "error": _why_not(rep, generation, manifest, self.config.settle_timeout_s)}
                          for r, rep in reports.items() if not _serves(rep, generation, manifest)]
                return replicas, failed
            await asyncio.sleep(0.2)


def _serves(report: dict | None, generation: int, manifest) -> bool:
    serving = (report or {}).get("serving") or {}
    return (report is not None and report["generation"] >= generation
            and serving.get("version") == manifest.version and serving.get("sha256") == manifest.sha256)


def _why_not(report: dict | None, generation: int, manifest, timeout_s: float) -> str:
    if report is None or report["generation"] < generation:
        return f"did not report generation {generation} within {timeout_s:.0f}s"
    if report.get("error"):
        return report["error"]
    serving = report.get("serving") or {}
    return f"serves version {serving.get('version')} (sha256 {str(serving.get('sha256'))[:12]}), not {manifest.version}"
