"""Talking to a running GMM-CIL application: announce a new version, classify an image.

Only httpx and the standard library at import time, so a training job can import it cheaply.

    from serve.client import announce
    announce("http://127.0.0.1:8000", manifest.version, token=os.environ.get("GMM_CIL_SERVE_ADMIN_TOKEN"))
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import httpx

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

from .auth import ADMIN_TOKEN_ENV, TOKEN_ENV  # noqa: F401  (stdlib only; TOKEN_ENV: the API token's variable)

log = logging.getLogger(__name__)


class AnnounceError(RuntimeError):
    """The application refused the version (unknown, corrupt, other stack) or could not be reached."""

    def __init__(self, status: int | None, detail: str):
        super().__init__(f"announce failed ({status}): {detail}" if status else f"announce failed: {detail}")
        self.status, self.detail = status, detail


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def announce(url: str, version: int | None = None, token: str | None = None, *, wait: bool = True,
             timeout_s: float = 180.0) -> dict[str, Any]:
    """Tell the app at `url` to serve store version `version` (None: the store's newest good one); `token` is the
    admin token ($GMM_CIL_SERVE_ADMIN_TOKEN), not the API token.

    POSTs to `{url}/v1/admin/reload`. With `wait`, returns once every Captioner replica serves it, or says which
    did not. Returns {"version", "sha256", "generation", "task", "rule", "previous", "settled", "replicas",
    "failed"}; raises AnnounceError if the app refuses (404 unknown version, 409 corrupt entry / other stack /
    no replica could load it / app not deployed from a config, 401 no or wrong token, 403 not the admin token)
    or is unreachable.
    """
    payload: dict[str, Any] = {"wait": wait}
    if version is not None:
        payload["version"] = int(version)
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/admin/reload", json=payload, headers=_headers(token),
                              timeout=timeout_s)
    except httpx.HTTPError as error:
        raise AnnounceError(None, f"{type(error).__name__}: {error}") from error
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise AnnounceError(response.status_code, str(detail))
    return response.json()


def announcer(url: str, token: str | None) -> Callable[[Any], None]:
    """An experiment's `on_publish` callback: tell the app at `url` of every new store version (anything with a
    `.version`) without waiting for it to settle; `token`: the admin token. A serving problem is logged, never fatal
    to the experiment."""

    def tell(manifest) -> None:
        try:
            announce(url, manifest.version, token=token, wait=False)
        except AnnounceError as error:
            log.warning("could not announce version %d to %s: %s", manifest.version, url, error)

    return tell


def announce_version(app: "str | DeploymentHandle" = "gmm-cil", version: int | None = None, *,
                     wait: bool = True) -> dict[str, Any]:
    """The same from a process connected to the app's Ray cluster, without HTTP or token: `app` is the
    application's name or its handle (`serve.get_app_handle(name)`)."""
    from ray import serve

    handle = serve.get_app_handle(app) if isinstance(app, str) else app
    result = handle.announce.remote(version, wait).result()
    status = result.pop("status")
    if status != 200:
        raise AnnounceError(status, result["detail"])
    return result


def classify(url: str, image: bytes, content_type: str = "image/png", token: str | None = None, *,
             top_k: int = 1, rule: str | None = None, client: httpx.Client | None = None,
             timeout_s: float = 60.0) -> httpx.Response:
    """POST raw image bytes to `{url}/v1/classify`; returns the response (check its status). `rule`: a decoding
    rule other than the served version's own (422 if that version lacks the class statistics it needs)."""
    params: dict[str, Any] = {"top_k": top_k}
    if rule:
        params["rule"] = rule
    headers = {"Content-Type": content_type, **_headers(token)}
    post = client.post if client is not None else httpx.post
    return post(f"{url.rstrip('/')}/v1/classify", content=image, params=params, headers=headers, timeout=timeout_s)
