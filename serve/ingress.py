"""The Ingress deployment: the FastAPI app (routes, bearer-token middleware, input checks, the web playground at `/`
from serve/static/) in front of the Captioner and the Watcher. It loads no model (gmm_model.rules is torch-free):
request checking is serve/inputs.py, who may call what is serve/auth.py; whether the version that answers has the
class statistics a requested rule needs is checked by the Captioner.

It is also where responses are ordered across Captioner replicas (one Ingress replica, see docs/serving.md): it
remembers the newest (generation, version) it has answered with and never returns an older one; a replica still
on an older version is asked again until one serves the newest (`_newest_answer`).
"""
# no `from __future__ import annotations`: FastAPI must resolve the route signatures at import time
import asyncio
import logging
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from gmm_model.rules import Rule

from . import deploy
from .auth import Auth, scope_of
from .inputs import InputError, decode_image, file_from_multipart, read_body, read_bounded
from .settings import AppArgs

logger = logging.getLogger("ray.serve")

api = FastAPI(title="GMM-CIL", description="Class-incremental image classification with a generative "
                                           "multi-modal model", version="1")

STATIC_DIR = Path(__file__).resolve().with_name("static")  # the playground: HTML, JS, CSS, no CDN
api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

NO_MODEL = "no model version has been published to the store yet"
DESCRIBE_HELP = ("after the label the model writes on: a short description, up to the Captioner's "
                 "`description_tokens`, ending at the model's own end token")
RULE_HELP = ("decoding rule (GET /v1/model lists those the served version has the class statistics for); "
             "default: the rule its accuracy was measured with (its manifest's `rule`)")

RELOAD_MAX_BYTES = 4096
BUSY_RETRY_AFTER_S = "1"

# who may call what (serve/auth.py), set by the Ingress replica (one per process) before it serves; until then every
# non-public path is refused. Set through a module-level function: Serve ships the ingress class by value (its
# methods get a copy of this module's globals), while this module's functions, the middleware among them, are
# imported by reference.
_auth: Auth | None = None


def _set_auth(value: Auth) -> None:
    global _auth
    _auth = value


@api.middleware("http")
async def require_token(request: Request, call_next):
    """The API needs the API (or admin) token, /v1/admin/* the admin token; checked before routing and before any
    body is read. /healthz and the playground's page and files are public: the page asks for the token itself."""
    scope = scope_of(request.url.path, request.scope.get("root_path", ""))
    if _auth is None:  # not set up yet: only the public paths
        failure = None if scope == "public" else (503, "the service is starting")
    else:
        failure = _auth.check(scope, request.headers.get("authorization"))
    if failure is not None:
        status, detail = failure
        return JSONResponse({"detail": detail}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    return await call_next(request)


def answer_order(result: dict) -> tuple[int, int] | None:
    """How new the version that produced an answer is: (generation, version); None for an answer without one."""
    if "generation" in result and "version" in result:
        return result["generation"], result["version"]
    return None


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
        auth = Auth.from_env()  # this replica's runtime_env: the same for every replica of the app
        host, port = deploy.http_address()
        auth.require_safe_bind(host)  # fails closed: the replica does not come up
        (logger.warning if auth.off else logger.info)("%s", auth.notice(f"http://{host}:{port}"))
        _set_auth(auth)
        self.newest: tuple[int, int] | None = None  # the newest (generation, version) answered with so far

    async def _newest_answer(self, call) -> dict:
        """`call(floor)` until it answers with a version at least as new as any answered before (the floor); a
        replica behind it says "stale" (or answers older) and is asked again. So once any client has seen
        generation N, no later answer is older. 503 if no replica catches up within args.version_wait_s."""
        deadline, pause = time.monotonic() + self.args.version_wait_s, 0.02
        while True:
            floor = self.newest
            try:
                result = await call(floor)
            except BackPressureError as error:
                raise HTTPException(503, f"busy, try again: {error.message}",
                                    headers={"Retry-After": BUSY_RETRY_AFTER_S}) from None
            order = answer_order(result)
            if result.get("error") != "stale" and (order is None or self.newest is None or order >= self.newest):
                if order is not None and (self.newest is None or order > self.newest):
                    self.newest = order  # no await between this check and the return: atomic in this loop
                return result
            if time.monotonic() > deadline:
                raise HTTPException(503, f"no Captioner replica serves generation {self.newest[0]} (version "
                                         f"{self.newest[1]}) or newer yet; try again",
                                    headers={"Retry-After": BUSY_RETRY_AFTER_S})
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.25)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/", include_in_schema=False)
    async def playground(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/v1/model")
    async def model(self) -> dict:
        info = await self._newest_answer(lambda floor: self.captioner.info.remote(floor))
        if info.get("error") == "no_model":
            raise HTTPException(503, NO_MODEL)
        return info

    @api.post("/v1/classify")
    async def classify(self, request: Request, top_k: int = Query(1, ge=1),
                       rule: Rule | None = Query(None, description=RULE_HELP),
                       describe: bool = Query(False, description=DESCRIBE_HELP)) -> dict:
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
        rule_name = rule.value if rule is not None else None
        result = await self._newest_answer(
            lambda floor: self.captioner.caption.remote(image, top_k, rule_name, describe, floor))
        error = result.get("error")
        if error == "no_model":
            raise HTTPException(503, NO_MODEL)
        if error is not None:  # unknown_rule, rule_unavailable
            raise HTTPException(422, result["detail"])
        return result

    async def announce(self, version: int | None = None, wait: bool = True) -> dict:
        """For handle callers in the cluster (serve.client.announce_version): what /v1/admin/reload does."""
        return await self.watcher.announce.remote(version, wait)

    @api.post("/v1/admin/reload")
    async def reload(self, request: Request) -> JSONResponse:
        """Body: optional JSON {"version": N, "wait": true}; an empty body means the store's latest."""
        try:
            raw = await read_bounded(request.headers.get("content-length"), request.stream(), RELOAD_MAX_BYTES)
        except InputError as error:
            raise HTTPException(error.status, f"reload body: {error.message}") from None
        try:
            body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValueError as error:
            raise HTTPException(422, f"reload body must be JSON like {{\"version\": 3, \"wait\": true}}: "
                                     f"{str(error).splitlines()[0]}") from None
        result = await self.watcher.announce.remote(body.version, body.wait)
        status = result.pop("status")
        if status != 200:  # the reason, and for a version no replica could load, each replica's
            result = {key: result[key] for key in ("detail", "failed") if key in result}
        return JSONResponse(result, status_code=status)
