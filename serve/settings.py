"""What the application and its deployments are configured with: the app's `args:` and each deployment's
user_config (serve/config.yaml). Plain pydantic, no Ray Serve and no model code, so the launcher, the deploy
tooling and every replica read them cheaply."""
from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .auth import ADMIN_TOKEN_ENV, TOKEN_ENV  # noqa: F401  (re-exported for the launcher)

DEFAULT_APP_NAME = "gmm-cil"
# the deployments whose user_config names the served version (deploy.set_served_version moves them together)
VERSIONED_DEPLOYMENTS = ("Captioner", "Matcher")


def default_cache_dir() -> str:
    return os.environ.get("GMM_CIL_CACHE", os.path.expanduser("~/.cache/gmm-cil"))


class AppArgs(BaseModel):
    """The application's arguments (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    store_url: str = Field(description="projection store URL (local path, file://, s3://...)")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold credentials
    stack: str | dict[str, Any] = "offline-small"
    cache_dir: str | None = Field(None, description="de-quantised LLM cache; default $GMM_CIL_CACHE or ~/.cache/gmm-cil")
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_top_k: int = Field(50, ge=1)
    threads: int = Field(1, ge=1, description="torch threads per model replica")
    version_wait_s: float = Field(30.0, gt=0, description="how long the Ingress retries a request whose replica "
                                                          "still serves an older version than one already answered")

    @model_validator(mode="before")
    @classmethod
    def _no_app_wide_decoding(cls, data: Any) -> Any:
        if isinstance(data, dict) and "decode" in data:
            raise ValueError("args.decode is gone: each version is served with the rule its manifest records "
                             "(the rule its accuracy was measured with); a request may ask for another with ?rule=")
        if isinstance(data, dict) and ({"token_sha256", "token_env"} & set(data)):
            raise ValueError(f"args.token_sha256 / args.token_env are gone: the tokens reach every replica through "
                             f"runtime_env.env_vars (${TOKEN_ENV}_SHA256 or ${TOKEN_ENV}, and "
                             f"${ADMIN_TOKEN_ENV}_SHA256 or ${ADMIN_TOKEN_ENV} for /v1/admin/*)")
        return data


class CaptionerConfig(BaseModel):
    """The Captioner's user_config: changed in place, without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="store version to serve; None: the newest good one at start-up")
    sha256: str | None = Field(None, description="the sha256 of that version's weights (set by the Watcher): a "
                                                 "version re-published with other weights is another version")
    generation: int = Field(0, ge=0, description="how many times the served version was moved; orders responses "
                                                 "across replicas (a roll-back is a newer generation)")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    description_tokens: int = Field(40, ge=1, le=256, description="most tokens a description (describe=true) "
                                                                   "may have; it ends earlier at the model's own end")


class MatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=0, description="version whose label bank to warm up")


class WatcherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    poll_interval_s: float = Field(10.0, gt=0)
    follow_latest: bool = Field(True, description="move to every newer committed version the store gets")
    settle_timeout_s: float = Field(120.0, gt=0)
