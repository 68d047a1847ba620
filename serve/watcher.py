"""The Watcher deployment (one replica, no CPU): moves the application to a new version, on its own when the
store gets a newer one (polling), or when told (`announce`). Either way through `deploy.set_served_version`, i.e.
Serve's user_config, so every Captioner and Matcher replica reconfigures in place.

It checks a version before moving to it (`captioner.read_version`: both files against their manifest's size and
sha256, and the stack fingerprint) without loading any model: this replica never imports torch.
"""
from __future__ import annotations

import asyncio
import logging

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
        self.lock = asyncio.Lock()
        self.refused: set[tuple[int, str]] = set()  # (version, created_at) already found unusable
        # the highest version served or announced so far: polling moves only beyond it, so an announced
        # roll-back stays until a newer version is published
        self.high_water: int | None = None
        self.declarative_warned = False
        self.task: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.config = WatcherConfig.model_validate(user_config or {})
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            if not self.config.follow_latest:
                continue
            try:
                await self.poll_once()
            except Exception:
                logger.exception("polling the projection store failed; trying again in %.1fs",
                                 self.config.poll_interval_s)

    def _check(self, version: int):
        """The manifest of a version fit to serve; raises LookupError / ValueError otherwise."""
        from .captioner import read_version

        return read_version(self.store, version, self.fingerprint).manifest

    async def poll_once(self) -> int | None:
        """Apply the store's latest version if it is newer than the served one; returns what was applied."""
        if await asyncio.to_thread(deploy.app_status, self.app_name) != "RUNNING":
            return None  # deploying or updating: look again next round
        latest = await asyncio.to_thread(self.store.latest)
        if latest is None or (latest.version, latest.created_at) in self.refused:
            return None
        async with self.lock:
            served = await asyncio.to_thread(deploy.served_version, self.app_name)
            self._raise_high_water(served)
            if self.high_water is not None and latest.version <= self.high_water:
                return None
            try:
                await asyncio.to_thread(self._check, latest.version)
                await asyncio.to_thread(deploy.set_served_version, self.app_name, latest.version)
            except (LookupError, ValueError) as error:
                self.refused.add((latest.version, latest.created_at))
                logger.error("not serving store version %s: %s", latest.version, error)
                return None
            except deploy.NotDeclarativeError as error:
                if not self.declarative_warned:
                    logger.error("%s", error)
                    self.declarative_warned = True
                return None
            self._raise_high_water(latest.version)
            logger.info("store has version %s: moving %s from version %s", latest.version, self.app_name, served)
            return latest.version

    def _raise_high_water(self, version: int | None) -> None:
        if version is not None and (self.high_water is None or version > self.high_water):
            self.high_water = version

    async def announce(self, version: int | None = None, wait: bool = True) -> dict:
        """Serve `version` (None: the store's latest). Returns a JSON-able result; `status` is an HTTP code."""
        async with self.lock:
            if version is None:
                latest = await asyncio.to_thread(self.store.latest)
                if latest is None:
                    return {"status": 404, "detail": f"projection store {self.store.url} has no version"}
                version = latest.version
            try:
                manifest = await asyncio.to_thread(self._check, version)
            except LookupError as error:
                return {"status": 404, "detail": str(error)}
            except ValueError as error:
                return {"status": 409, "detail": str(error)}
            previous = await asyncio.to_thread(deploy.served_version, self.app_name)
            try:
                await asyncio.to_thread(deploy.set_served_version, self.app_name, version)
            except deploy.NotDeclarativeError as error:
                return {"status": 409, "detail": str(error)}
            self._raise_high_water(previous)
            self._raise_high_water(version)
            settled = True
            if wait:
                settled = await asyncio.to_thread(deploy.wait_running, self.app_name, self.config.settle_timeout_s)
            logger.info("announced version %s (was %s), settled=%s", version, previous, settled)
            return {"status": 200, "version": version, "task": manifest.task, "rule": manifest.rule,
                    "previous": previous, "settled": settled}
