"""Who may call what: the API token, the separate admin token, and the rules that make the service fail closed.

Three scopes of path: `public` (the playground's page and files, /healthz), `api` (/v1/classify, /v1/model) and
`admin` (/v1/admin/*). The API token opens `api`; the admin token opens `api` and `admin`. Rules:

- no token at all: auth is off. Allowed only on a loopback address, and said so at start (`notice`).
- an API token but no admin token: the admin API is closed over HTTP (403); in-cluster callers still move versions
  through a handle (serve.client.announce_version).
- a non-loopback HTTP address without an API token: refused (`require_safe_bind`), by the launcher before Serve
  starts and again by every Ingress replica, which then does not come up.

The tokens reach every replica through the application's runtime environment (`runtime_env.env_vars`, the same
for every replica on every node): `$GMM_CIL_SERVE_TOKEN_SHA256` / `$GMM_CIL_SERVE_ADMIN_TOKEN_SHA256` (what the
launcher puts there: only the sha256 leaves the launching process), or the tokens themselves in
`$GMM_CIL_SERVE_TOKEN` / `$GMM_CIL_SERVE_ADMIN_TOKEN` (e.g. `"${GMM_CIL_SERVE_TOKEN}"` in serve/config.yaml,
expanded from each node's environment, which cluster.yaml sets on every node). No Ray, no FastAPI: unit-tested.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

TOKEN_ENV = "GMM_CIL_SERVE_TOKEN"
ADMIN_TOKEN_ENV = "GMM_CIL_SERVE_ADMIN_TOKEN"
DIGEST_SUFFIX = "_SHA256"
ADMIN_PREFIX = "/v1/admin/"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class InsecureBindError(RuntimeError):
    """The service would listen on a non-loopback address without a token."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str | None) -> bool:
    if host in (None, ""):
        return False  # Serve's default binds every interface
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def scope_of(path: str, root_path: str = "") -> str:
    """'public', 'api' or 'admin' for a request path (relative to the app's route prefix)."""
    root = root_path.rstrip("/")
    relative = path[len(root):] if root and path.startswith(root) else path
    if relative in ("", "/", "/healthz", "/healthz/") or relative.startswith("/static/"):
        return "public"
    return "admin" if relative.startswith(ADMIN_PREFIX) or relative == ADMIN_PREFIX.rstrip("/") else "api"


def env_vars(token: str | None, admin_token: str | None) -> dict[str, str]:
    """What the launcher puts into the application's runtime_env.env_vars: the tokens' sha256, never the tokens."""
    out = {}
    if token:
        out[TOKEN_ENV + DIGEST_SUFFIX] = digest(token)
    if admin_token:
        out[ADMIN_TOKEN_ENV + DIGEST_SUFFIX] = digest(admin_token)
    return out


def _resolve(env: Mapping[str, str], name: str) -> str | None:
    hashed = (env.get(name + DIGEST_SUFFIX) or "").strip().lower()
    if hashed:
        if not _HEX64.fullmatch(hashed):
            raise ValueError(f"${name}{DIGEST_SUFFIX} must be 64 hex digits (the sha256 of the token)")
        return hashed
    token = (env.get(name) or "").strip()
    return digest(token) if token else None


@dataclass(frozen=True)
class Auth:
    """The sha256 of the API token and of the admin token; None: not configured."""

    api_sha256: str | None = None
    admin_sha256: str | None = None

    def __post_init__(self):
        if self.api_sha256 is not None and self.api_sha256 == self.admin_sha256:
            raise ValueError("the admin token must differ from the API token: any client could move the "
                             "served version otherwise")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Auth":
        env = os.environ if env is None else env
        return cls(_resolve(env, TOKEN_ENV), _resolve(env, ADMIN_TOKEN_ENV))

    @property
    def off(self) -> bool:
        return self.api_sha256 is None and self.admin_sha256 is None

    def require_safe_bind(self, host: str | None) -> None:
        if self.api_sha256 is None and not is_loopback(host):
            raise InsecureBindError(
                f"refusing to serve on {host or 'every interface'!r} without an API token: set ${TOKEN_ENV} "
                f"(and ${ADMIN_TOKEN_ENV} for /v1/admin/*), or bind 127.0.0.1")

    def notice(self, where: str) -> str:
        """The line said at start: which tokens are on."""
        if self.off:
            return (f"AUTH IS OFF on {where}: no ${TOKEN_ENV} or ${ADMIN_TOKEN_ENV}; every endpoint, /v1/admin/* "
                    "(moving the served version) included, is open to anyone who can reach it")
        api = "API token on" if self.api_sha256 else "API open (no API token)"
        admin = ("admin token on" if self.admin_sha256 else
                 f"admin API closed over HTTP (no ${ADMIN_TOKEN_ENV}; in-cluster announce_version still works)")
        return f"auth on {where}: {api}, {admin}"

    def check(self, scope: str, authorization: str | None) -> tuple[int, str] | None:
        """None if the request may go on; else (status, message): 401 no or wrong token, 403 a valid token that
        may not do this."""
        if scope == "public" or self.off:
            return None
        presented = _bearer(authorization)
        is_admin = presented is not None and self.admin_sha256 is not None and hmac.compare_digest(
            digest(presented), self.admin_sha256)
        is_api = presented is not None and self.api_sha256 is not None and hmac.compare_digest(
            digest(presented), self.api_sha256)
        if scope == "api":
            if self.api_sha256 is None or is_api or is_admin:
                return None
            return 401, "missing or wrong bearer token"
        if self.admin_sha256 is None:
            return 403, (f"the admin API is closed: no admin token is configured (${ADMIN_TOKEN_ENV}); "
                         "in the cluster, use serve.client.announce_version")
        if is_admin:
            return None
        if is_api:
            return 403, f"this token may not use {ADMIN_PREFIX}*: it needs the admin token"
        return 401, "missing or wrong admin bearer token"


def _bearer(authorization: str | None) -> str | None:
    scheme, _, presented = (authorization or "").partition(" ")
    presented = presented.strip()
    return presented if scheme.lower() == "bearer" and presented else None
