"""The GMM-CIL Ray Serve application: an HTTP ingress in front of two independently scaled deployments.

    Ingress (FastAPI)  --caption-->  Captioner  --similarities (free decoding only)-->  Matcher
        |                          encoder + projection + frozen LLM,            text encoder +
        |                          @serve.batch, one (projection, classes)       label bank
        |                          version per batch
        +--announce-->  Watcher: polls the projection store, moves the app to a new version

A model version is one store entry: (projection weights, seen classes). The Captioner turns each
version into one immutable `ServedVersion` (a GMM sharing the frozen LLM, with that version's
projection, plus that version's class list) and swaps the whole object with a single assignment.
A batch reads the reference once and is answered entirely by it, so no response can pair one
version's projection with another's classes, and every response names the version that produced it.

Prediction goes through `gmm_model.predict.predict`, the function evaluation uses:
- `trie` (default): the Captioner decodes constrained to the version's class names; the label is
  final; `top_k` beyond the first ranks the other classes by the log-probability of their first name
  token (the model's own ranking). The Matcher takes no part.
- `free` (the paper): the Captioner generates text and hands it, with the version's class list, to
  the Matcher deployment through a `TextMatcher` stand-in (`RemoteMatcher`); the Matcher embeds the
  text and returns cosine similarities against its label bank; top_k are the most similar classes.

Versions change through Serve's user_config: the Captioner's and Matcher's `reconfigure` load the
version their user_config names (see serve/rollout.py for how the Watcher changes it in place).
"""
# no `from __future__ import annotations`: FastAPI must resolve the route signatures at import time
import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from . import rollout
from .inputs import InputError, decode_image, file_from_multipart, read_body

logger = logging.getLogger("ray.serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")
DEFAULT_APP_NAME = "gmm-cil"
TOKEN_ENV = "GMM_CIL_SERVE_TOKEN"
Decode = Literal["trie", "free"]


def default_cache_dir() -> str:
    return os.environ.get("GMM_CIL_CACHE", os.path.expanduser("~/.cache/gmm-cil"))


def resolve_stack(spec: str | dict):
    """A preset name, or a mapping with `preset:` plus fields that override it (as in experiment configs)."""
    from gmm_model import PRESETS, ModelStack

    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    name = spec.pop("preset", None)
    if name is None:
        return ModelStack.model_validate(spec)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelStack.model_validate({**PRESETS[name].model_dump(), **spec})


class AppArgs(BaseModel):
    """The application's arguments (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    store_url: str = Field(description="projection store URL (local path, file://, s3://...)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    stack: str | dict[str, Any] = "offline-small"
    cache_dir: str | None = Field(None, description="de-quantised LLM cache; default $GMM_CIL_CACHE or ~/.cache/gmm-cil")
    decode: Decode = "trie"
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_top_k: int = Field(50, ge=1)
    token_sha256: str | None = Field(None, description="sha256 hex of the bearer token; default: $GMM_CIL_SERVE_TOKEN")
    token_env: str = TOKEN_ENV
    threads: int = Field(1, ge=1, description="torch threads per model replica")


class CaptionerConfig(BaseModel):
    """The Captioner's user_config: changed in place, without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="store version to serve; None: the latest at start-up")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)


class MatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="version whose label bank to warm up")


class WatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    poll_interval_s: float = Field(10.0, gt=0)
    follow_latest: bool = Field(True, description="move to every newer committed version the store gets")
    settle_timeout_s: float = Field(120.0, gt=0)


# ---------------------------------------------------------------------------------------------------
# Captioner
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedVersion:
    """One model version, immutable: its projection (inside `gmm`) and its classes travel together."""

    version: int
    task: int
    classes: tuple[str, ...]
    stack_fingerprint: str
    created_at: str
    gmm: Any  # gmm_model.GMM sharing the frozen LLM, with this version's projection


@dataclass(frozen=True)
class CaptionJob:
    image: np.ndarray
    top_k: int
    decode: str


class RemoteMatcher:
    """A `TextMatcher` stand-in whose similarities come from the Matcher deployment, so free decoding
    runs through `gmm_model.predict.predict` exactly as in evaluation. Called from the Captioner's
    compute thread (never its event loop), where blocking on a handle response is allowed."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def similarities(self, texts: list[str], class_names: list[str]):
        import torch

        return torch.from_numpy(self.handle.similarities.remote(list(texts), list(class_names)).result())


@serve.deployment(name="Captioner", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Captioner:
    def __init__(self, store_url: str, storage_options: dict, stack: dict, cache_dir: str | None,
                 matcher: DeploymentHandle, threads: int = 1):
        import torch

        from cil_platform.store import ProjectionStore
        from gmm_model import ModelStack, create_encoder, create_gmm

        torch.set_num_threads(threads)
        self.stack = ModelStack.model_validate(stack)
        self.store = ProjectionStore(store_url, storage_options)
        self.encoder = create_encoder(self.stack).eval()
        self.base = create_gmm(self.stack, self.encoder.width, cache_dir or default_cache_dir())
        self.matcher = RemoteMatcher(matcher)
        self.active: ServedVersion | None = None
        self.compute = threading.Lock()  # one model computation at a time: a batch, or building a version
        self.config = CaptionerConfig()

    # ---- versions ----------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        config = CaptionerConfig.model_validate(user_config or {})
        self._caption.set_max_batch_size(config.max_batch_size)
        self._caption.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config
        # off the event loop: requests keep being answered by the current version meanwhile
        await asyncio.to_thread(self._activate, config.version)

    def _activate(self, version: int | None) -> None:
        if version is None:
            latest = self.store.latest()
            if latest is None:
                logger.warning("projection store %s has no version yet; /v1/classify answers 503 until one "
                               "is published", self.store.url)
                return
            version = latest.version
        if self.active is not None and self.active.version == version:
            return
        try:
            served = self._load(version)
        except Exception:
            if self.active is None:
                raise  # a replica without any model must not come up
            logger.exception("could not load version %s; still serving version %s", version, self.active.version)
            return
        self.active = served  # the swap: one reference assignment
        logger.info("serving version %s (task %s, %s classes)", served.version, served.task, len(served.classes))

    def _load(self, version: int) -> ServedVersion:
        from gmm_model import GMM, Projection

        manifest, weights = self.store.load(version)
        if manifest.stack_fingerprint != self.stack.fingerprint:
            raise ValueError(f"version {version} was trained for stack {manifest.stack_fingerprint}, "
                             f"this app serves stack {self.stack.fingerprint}")
        base = self.base
        projection = Projection(base.projection.in_features, base.projection.out_features).load_bytes(weights)
        with self.compute:
            gmm = GMM(base.llm, base.tokenizer, projection, self.stack.prompt).eval()
            gmm.prefix_cache(1)  # compute the shared prompt prefix now, not in the first request
        return ServedVersion(manifest.version, manifest.task, tuple(manifest.seen_classes),
                             manifest.stack_fingerprint, manifest.created_at, gmm)

    def info(self) -> dict | None:
        served = self.active
        if served is None:
            return None
        return {"version": served.version, "task": served.task, "seen_classes": list(served.classes),
                "num_classes": len(served.classes), "stack_fingerprint": served.stack_fingerprint,
                "created_at": served.created_at}

    # ---- prediction --------------------------------------------------------------------------
    async def caption(self, image: np.ndarray, top_k: int, decode: str) -> dict:
        if self.active is None:
            return {"error": "no_model"}
        return await self._caption(CaptionJob(image, top_k, decode))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _caption(self, jobs: list[CaptionJob]) -> list[dict]:
        served = self.active  # read once: this batch is answered by exactly this version
        if served is None:
            return [{"error": "no_model"}] * len(jobs)
        return await asyncio.to_thread(self._run, served, jobs)

    def _run(self, served: ServedVersion, jobs: list[CaptionJob]) -> list[dict]:
        from gmm_model.predict import predict

        classes = list(served.classes)
        out: list[dict] = [{}] * len(jobs)
        with self.compute:
            visual = self.encoder.encode([job.image for job in jobs])
            for mode in ("trie", "free"):
                index = [i for i, job in enumerate(jobs) if job.decode == mode]
                if not index:
                    continue
                k = max(jobs[i].top_k for i in index)
                predictions = predict(served.gmm, visual[index], classes, mode,
                                      self.matcher if mode == "free" else None, top_k=k)
                for i, p in zip(index, predictions):
                    out[i] = {"label": p.label, "score": p.score, "text": p.text,
                              "top_k": [{"label": label, "score": score} for label, score in p.top_k[:jobs[i].top_k]],
                              "decode": mode, "version": served.version, "task": served.task}
        return out


# ---------------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------------

@serve.deployment(name="Matcher", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Matcher:
    """The text encoder and its label bank (class-name embeddings, cached by name across versions)."""

    def __init__(self, store_url: str, storage_options: dict, stack: dict, threads: int = 1):
        import torch

        from cil_platform.store import ProjectionStore
        from gmm_model import ModelStack, create_matcher

        torch.set_num_threads(threads)
        self.store = ProjectionStore(store_url, storage_options)
        self.matcher = create_matcher(ModelStack.model_validate(stack))
        self.lock = threading.Lock()
        self.version: int | None = None

    async def reconfigure(self, user_config: dict) -> None:
        config = MatcherConfig.model_validate(user_config or {})
        await asyncio.to_thread(self._warm, config.version)

    def _warm(self, version: int | None) -> None:
        try:
            manifest = self.store.latest() if version is None else self.store.manifest(version)
            if manifest is None:
                return
            with self.lock:
                self.matcher.label_bank(list(manifest.seen_classes))
            self.version = manifest.version
        except Exception:  # warming is an optimisation; matching works from the class list it is given
            logger.exception("could not warm the label bank for version %s", version)

    async def similarities(self, texts: list[str], class_names: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self._similarities, texts, class_names)

    def _similarities(self, texts: list[str], class_names: list[str]) -> np.ndarray:
        with self.lock:
            return self.matcher.similarities(texts, class_names).numpy()


# ---------------------------------------------------------------------------------------------------
# Watcher
# ---------------------------------------------------------------------------------------------------

@serve.deployment(name="Watcher", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class Watcher:
    """Moves the app to a new version: on its own when the store gets a newer one (polling), or when
    told (`announce`). Either way through rollout.set_served_version, i.e. Serve's user_config."""

    def __init__(self, store_url: str, storage_options: dict, stack_fingerprint: str):
        from cil_platform.store import ProjectionStore

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
        from cil_platform.store import CorruptEntryError

        try:
            manifest, _ = self.store.load(version)  # verifies size and sha256 of the weights
        except FileNotFoundError as error:
            raise LookupError(str(error)) from None
        except CorruptEntryError as error:
            raise ValueError(str(error)) from None
        if manifest.stack_fingerprint != self.fingerprint:
            raise ValueError(f"version {version} was trained for stack {manifest.stack_fingerprint}; "
                             f"this app serves stack {self.fingerprint}")
        return manifest

    async def poll_once(self) -> int | None:
        """Apply the store's latest version if it is newer than the served one; returns what was applied."""
        if await asyncio.to_thread(rollout.app_status, self.app_name) != "RUNNING":
            return None  # deploying or updating: look again next round
        latest = await asyncio.to_thread(self.store.latest)
        if latest is None or (latest.version, latest.created_at) in self.refused:
            return None
        async with self.lock:
            served = await asyncio.to_thread(rollout.served_version, self.app_name)
            self._raise_high_water(served)
            if self.high_water is not None and latest.version <= self.high_water:
                return None
            try:
                await asyncio.to_thread(self._check, latest.version)
                await asyncio.to_thread(rollout.set_served_version, self.app_name, latest.version)
            except (LookupError, ValueError) as error:
                self.refused.add((latest.version, latest.created_at))
                logger.error("not serving store version %s: %s", latest.version, error)
                return None
            except rollout.NotDeclarativeError as error:
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
            previous = await asyncio.to_thread(rollout.served_version, self.app_name)
            try:
                await asyncio.to_thread(rollout.set_served_version, self.app_name, version)
            except rollout.NotDeclarativeError as error:
                return {"status": 409, "detail": str(error)}
            self._raise_high_water(previous)
            self._raise_high_water(version)
            settled = True
            if wait:
                settled = await asyncio.to_thread(rollout.wait_running, self.app_name, self.config.settle_timeout_s)
            logger.info("announced version %s (was %s), settled=%s", version, previous, settled)
            return {"status": 200, "version": version, "task": manifest.task, "previous": previous,
                    "settled": settled}


# ---------------------------------------------------------------------------------------------------
# Ingress
# ---------------------------------------------------------------------------------------------------

api = FastAPI(title="GMM-CIL", description="Class-incremental image classification with a generative "
                                           "multi-modal model", version="1")

# sha256 of the bearer token, set by the Ingress replica (one per process) before it serves; None: no token.
# Set through a module-level function: Serve ships the ingress class by value (its methods get a copy of this
# module's globals), while this module's functions, the middleware among them, are imported by reference.
_token_sha256: str | None = None


def _set_token_sha256(value: str | None) -> None:
    global _token_sha256
    _token_sha256 = value


@api.middleware("http")
async def require_token(request: Request, call_next):
    """Every endpoint but /healthz needs the bearer token; checked before routing and body validation."""
    if _token_sha256 is not None and not request.url.path.rstrip("/").endswith("/healthz"):
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not presented.strip() or not hmac.compare_digest(digest, _token_sha256):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="store version to serve; omitted: the latest")
    wait: bool = Field(True, description="answer once every replica serves it")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, captioner: DeploymentHandle, watcher: DeploymentHandle, settings: dict):
        self.captioner, self.watcher = captioner, watcher
        self.args = AppArgs.model_validate(settings)
        token = os.environ.get(self.args.token_env)
        _set_token_sha256(self.args.token_sha256 or (hashlib.sha256(token.encode()).hexdigest() if token else None))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict:
        info = await self.captioner.info.remote()
        if info is None:
            raise HTTPException(503, "no model version has been published to the store yet")
        return {**info, "decode": self.args.decode}

    @api.post("/v1/classify")
    async def classify(self, request: Request, top_k: int = Query(1, ge=1),
                       decode: Decode | None = Query(None, description="trie or free; default: the app's")) -> dict:
        if top_k > self.args.max_top_k:
            raise HTTPException(422, f"top_k must be at most {self.args.max_top_k}")
        try:
            kind, body = await read_body(request.headers.get("content-type"), request.headers.get("content-length"),
                                         request.stream(), self.args.max_image_bytes)
            if kind == "multipart":
                body = await file_from_multipart(request.headers, body, self.args.max_image_bytes)
            image = await asyncio.to_thread(decode_image, body, self.args.max_image_pixels)
        except InputError as error:
            raise HTTPException(error.status, error.message) from None
        result = await self.captioner.caption.remote(image, top_k, decode or self.args.decode)
        if result.get("error") == "no_model":
            raise HTTPException(503, "no model version has been published to the store yet")
        return result

    async def announce(self, version: int | None = None, wait: bool = True) -> dict:
        """For handle callers in the cluster (serve.client.announce_version): what /v1/admin/reload does."""
        return await self.watcher.announce.remote(version, wait)

    @api.post("/v1/admin/reload")
    async def reload(self, request: Request) -> JSONResponse:
        """Body: optional JSON {"version": N, "wait": true}; an empty body means the store's latest."""
        raw = await request.body()
        if len(raw) > 4096:
            raise HTTPException(413, "reload body too large")
        try:
            body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValueError as error:
            raise HTTPException(422, f"reload body must be JSON like {{\"version\": 3, \"wait\": true}}: "
                                     f"{str(error).splitlines()[0]}") from None
        result = await self.watcher.announce.remote(body.version, body.wait)
        status = result.pop("status")
        return JSONResponse(result if status == 200 else {"detail": result["detail"]}, status_code=status)


# ---------------------------------------------------------------------------------------------------
# Building and starting
# ---------------------------------------------------------------------------------------------------

def app_builder(args: dict) -> serve.Application:
    """The application from its arguments (`import_path: serve.app:app_builder` in serve/config.yaml)."""
    settings = AppArgs.model_validate(args)
    stack = resolve_stack(settings.stack)
    matcher = Matcher.options(user_config=MatcherConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.model_dump(), settings.threads)
    captioner = Captioner.options(user_config=CaptionerConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.model_dump(), settings.cache_dir, matcher,
        settings.threads)
    watcher = Watcher.options(user_config=WatcherConfig().model_dump()).bind(
        settings.store_url, settings.storage_options, stack.fingerprint)
    return Ingress.bind(captioner, watcher, settings.model_dump())


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def application_config(store_url: str, *, name: str = DEFAULT_APP_NAME, route_prefix: str = "/",
                       token: str | None = None, args: dict | None = None,
                       deployments: dict[str, dict] | None = None, config_path: str | Path = DEFAULT_CONFIG,
                       working_dir: str | Path = REPO_ROOT) -> dict:
    """The application entry of serve/config.yaml with this checkout as working_dir and the given overrides.

    `deployments` maps a deployment name to options merged over the file's (user_config merged key by key).
    """
    config = load_config(config_path)
    app = dict(config["applications"][0])
    app.update(name=name, route_prefix=route_prefix)
    app["args"] = {**app.get("args", {}), "store_url": str(store_url), **(args or {})}
    if token is not None:
        app["args"]["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    runtime_env = dict(app.get("runtime_env") or {})
    runtime_env["working_dir"] = f"local://{Path(working_dir).resolve()}"
    app["runtime_env"] = runtime_env
    entries = {d["name"]: dict(d) for d in app.get("deployments", [])}
    for deployment, options in (deployments or {}).items():
        entry = entries.setdefault(deployment, {"name": deployment})
        for key, value in options.items():
            if isinstance(value, dict) and isinstance(entry.get(key), dict):
                entry[key] = {**entry[key], **value}
            else:
                entry[key] = value
    app["deployments"] = list(entries.values())
    return app


def start(store_url: str, *, host: str = "127.0.0.1", port: int = 8000, name: str = DEFAULT_APP_NAME,
          route_prefix: str = "/", token: str | None = None, args: dict | None = None,
          deployments: dict[str, dict] | None = None, config_path: str | Path = DEFAULT_CONFIG,
          timeout_s: float = 300.0) -> str:
    """Deploy the application from serve/config.yaml (declaratively, as `serve deploy` does, so versions
    can be swapped in place) on the connected Ray cluster; returns the base URL once it is RUNNING.

    Starts Serve with HTTP on host:port if it is not running. Other declaratively deployed applications
    are kept. `token` protects every endpoint but /healthz (only its sha256 reaches the cluster).
    """
    import ray
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    client = _get_global_client()
    app = ServeApplicationSchema.model_validate(application_config(
        store_url, name=name, route_prefix=route_prefix, token=token, args=args, deployments=deployments,
        config_path=config_path))
    details = ServeInstanceDetails(**client.get_serve_details())
    others = [a.deployed_app_config for n, a in details.applications.items()
              if n != name and a.deployed_app_config is not None]
    fields: dict[str, Any] = {"applications": [*others, app]}
    if details.http_options is not None:
        fields["http_options"] = details.http_options
    if details.proxy_location is not None:
        fields["proxy_location"] = details.proxy_location
    client.deploy_apps(ServeDeploySchema(**fields))
    deadline = time.monotonic() + timeout_s
    status = "NOT_STARTED"
    while time.monotonic() < deadline:
        status = rollout.app_status(name)
        if status == "RUNNING":
            break
        if status == "DEPLOY_FAILED":
            message = ServeInstanceDetails(**client.get_serve_details()).applications[name].message
            raise RuntimeError(f"application {name!r} failed to deploy: {message}")
        time.sleep(0.5)
    else:
        raise TimeoutError(f"application {name!r} not running after {timeout_s:.0f}s (status {status})")
    client.wait_for_proxies_serving(wait_for_applications_running=True)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
