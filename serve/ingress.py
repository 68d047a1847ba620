"""The Ingress deployment: the FastAPI app (routes, bearer-token middleware, input checks, the web playground at `/`
from serve/static/) in front of the Captioner and the Watcher. It loads no model (gmm_model.rules is torch-free):
request checking is serve/inputs.py; whether the version that answers has the class statistics a requested rule
needs is checked by the Captioner."""
# no `from __future__ import annotations`: FastAPI must resolve the route signatures at import time
import asyncio
import hashlib
import hmac
import os
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from gmm_model.rules import Rule

from .inputs import InputError, decode_image, file_from_multipart, read_body
from .settings import AppArgs

api = FastAPI(title="GMM-CIL", description="Class-incremental image classification with a generative "
                                           "multi-modal model", version="1")

STATIC_DIR = Path(__file__).resolve().with_name("static")  # the playground: HTML, JS, CSS, no CDN
api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

NO_MODEL = "no model version has been published to the store yet"
DESCRIBE_HELP = ("after the label the model writes on: a short description, up to the Captioner's "
                 "`description_tokens`, ending at the model's own end token")
RULE_HELP = ("decoding rule (GET /v1/model lists those the served version has the class statistics for); "
             "default: the rule its accuracy was measured with (its manifest's `rule`)")

# sha256 of the bearer token, set by the Ingress replica (one per process) before it serves; None: no token.
# Set through a module-level function: Serve ships the ingress class by value (its methods get a copy of this
# module's globals), while this module's functions, the middleware among them, are imported by reference.
_token_sha256: str | None = None


def _set_token_sha256(value: str | None) -> None:
    global _token_sha256
    _token_sha256 = value


def is_public(request: Request) -> bool:
    """/healthz and the playground's page and files need no token: the page itself asks for it."""
    path = request.url.path
    root = request.scope.get("root_path", "").rstrip("/")
    relative = path[len(root):] if root and path.startswith(root) else path
    return relative in ("", "/", "/healthz", "/healthz/") or relative.startswith("/static/")


@api.middleware("http")
async def require_token(request: Request, call_next):
    """Every endpoint but the public ones needs the bearer token; checked before routing and body validation."""
    if _token_sha256 is not None and not is_public(request):
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

    @api.get("/", include_in_schema=False)
    async def playground(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/v1/model")
    async def model(self) -> dict:
        info = await self.captioner.info.remote()
        if info is None:
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
        result = await self.captioner.caption.remote(image, top_k, rule.value if rule is not None else None, describe)
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
