"""Deploying the application and moving it between versions, through the controller's declarative config.

Both go through `redeploy(name, entry)`: it rebuilds the whole declarative config from what the controller holds
(the other declaratively deployed applications, proxy_location, http_options, grpc_options, target_capacity),
replaces one application's entry and applies it, as `serve deploy` does (applying a config deletes the
declarative applications it does not name, so they are all passed through).

- `start(store_url, ...)`: deploy serve/config.yaml's application with this checkout as working_dir.
- `set_served_version(app, version, sha256)`: the version a deployment serves is a key of its `user_config`, with
  the sha256 of its weights and a generation (one more than the live one: the order of moves). Changing only
  a user_config keeps the code version (import path, args and runtime_env are unchanged), so the controller calls
  `reconfigure` on every live replica in place — no restart, no new process — and hands the same user_config to
  every replica autoscaling starts later. The Watcher calls it from inside the cluster.

Thread safety: building Serve's schemas (ServeInstanceDetails, ServeDeploySchema) is not thread-safe
(`ray.serve.config` registers and unregisters the autoscaling policy's module with cloudpickle, process-wide; a
status read racing with it failed with "... is not registered for pickle by value"). So only `redeploy` builds
them, and its callers serialise (the Watcher's lock; `start` from a driver); the status reads (`app_status`,
`served_version`, `wait_running`) read the controller's plain JSON details and are safe from any thread.

Hot swapping needs an application deployed from a config (`serve deploy` / `serve run serve/config.yaml` /
`start`); one deployed with `serve.run(app)` from Python has no such config (`NotDeclarativeError`).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from cil_platform.paths import REPO_ROOT

from .auth import Auth, env_vars
from .settings import DEFAULT_APP_NAME, VERSIONED_DEPLOYMENTS

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


class NotDeclarativeError(RuntimeError):
    """The application was not deployed from a config, so there is no user_config to edit."""


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


# ---- status reads: the controller's plain JSON details, no schema built (safe from any thread) ----------------

def _application(app_name: str) -> dict | None:
    return (_client().get_serve_details().get("applications") or {}).get(app_name)


def app_status(app_name: str) -> str:
    app = _application(app_name)
    if app is None:
        return "NOT_FOUND"
    status = app.get("status")  # an ApplicationStatus (a str enum) in the controller's dict
    return str(getattr(status, "value", status))


def _deployment(app_name: str, deployment: str) -> dict:
    app = _application(app_name)
    if app is None:
        raise KeyError(f"no Serve application named {app_name!r}")
    return (app.get("deployments") or {}).get(deployment) or {}


def served_config(app_name: str) -> dict:
    """The Captioner's effective user_config: {"version", "sha256", "generation", ...} (version None: the newest
    good one at start-up)."""
    deployment = _deployment(app_name, VERSIONED_DEPLOYMENTS[0])
    return dict((deployment.get("deployment_config") or {}).get("user_config") or {})


def served_version(app_name: str) -> int | None:
    """The version named in the Captioner's effective user_config (None: the newest good one at start-up)."""
    return served_config(app_name).get("version")


def running_replicas(app_name: str, deployment: str = VERSIONED_DEPLOYMENTS[0]) -> list[str]:
    """The ids (`serve.get_replica_context().replica_tag`) of the deployment's RUNNING replicas."""
    replicas = _deployment(app_name, deployment).get("replicas") or []
    return sorted(r["replica_id"] for r in replicas
                  if str(getattr(r.get("state"), "value", r.get("state"))) == "RUNNING")


def http_address() -> tuple[str | None, int | None]:
    """Where Serve's HTTP proxies listen (host, port), as the controller has it."""
    config = _client().http_config
    return config.host, config.port


def wait_running(app_name: str, timeout_s: float, poll_s: float = 0.2) -> bool:
    """Wait until the application is RUNNING again (every replica reconfigured); False on time-out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app_status(app_name) == "RUNNING":
            return True
        time.sleep(poll_s)
    return False


# ---- the one redeploy path --------------------------------------------------------------------------------

def redeploy(name: str, entry: Callable[[Any], dict]) -> None:
    """Apply the controller's declarative config again with application `name`'s entry replaced by
    `entry(current)`, `current` being its ApplicationDetails (None if there is no such application: then it is
    added). Everything else the controller holds is kept. Returns once the controller has the new target.
    Builds Serve's schemas: callers must not run two at once (see the module docstring)."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    details = ServeInstanceDetails(**_client().get_serve_details())
    replacement = ServeApplicationSchema.model_validate(entry(details.applications.get(name)))
    applications, placed = [], False
    for other, app in details.applications.items():
        if other == name:
            applications.append(replacement)
            placed = True
        elif app.deployed_app_config is not None:  # imperatively deployed apps are not part of the config: left alone
            applications.append(ServeApplicationSchema.model_validate(
                app.deployed_app_config.model_dump(exclude_unset=True)))
    if not placed:
        applications.append(replacement)
    fields: dict[str, Any] = {"applications": applications, "target_capacity": details.target_capacity}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if getattr(details, key) is not None:
            fields[key] = getattr(details, key)
    _client().deploy_apps(ServeDeploySchema(**fields))


def set_served_version(app_name: str, version: int, sha256: str | None = None) -> int:
    """Redeploy the app's current declarative config with user_config.version = `version` on the Captioner and
    the Matcher (their other user_config keys as they are live), and on the Captioner the weights' `sha256` and
    the next generation. Returns that generation once the app is DEPLOYING."""
    moved: dict[str, int] = {}

    def with_version(current) -> dict:
        if current is None:
            raise KeyError(f"no Serve application named {app_name!r}")
        if current.deployed_app_config is None:
            raise NotDeclarativeError(
                f"application {app_name!r} was deployed with serve.run() from Python; hot swapping needs "
                "a config deploy (serve deploy/run serve/config.yaml, python -m serve.launch or serve.deploy.start)")
        tree: dict[str, Any] = current.deployed_app_config.model_dump(exclude_unset=True)
        deployments = {d["name"]: d for d in tree.get("deployments", [])}
        for deployment in VERSIONED_DEPLOYMENTS:
            live = current.deployments.get(deployment)
            live_config = dict((live.deployment_config.user_config if live else None) or {})
            entry = deployments.setdefault(deployment, {"name": deployment})
            config = {**live_config, **(entry.get("user_config") or {}), "version": int(version)}
            if deployment == VERSIONED_DEPLOYMENTS[0]:
                moved["generation"] = int(live_config.get("generation") or 0) + 1
                config.update(sha256=sha256, generation=moved["generation"])
            entry["user_config"] = config
        tree["deployments"] = list(deployments.values())
        return tree

    redeploy(app_name, with_version)
    return moved["generation"]


# ---- the application entry, and starting it ----------------------------------------------------------------

def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def application_config(store_url: str, *, name: str = DEFAULT_APP_NAME, route_prefix: str = "/",
                       token: str | None = None, admin_token: str | None = None, args: dict | None = None,
                       deployments: dict[str, dict] | None = None, config_path: str | Path = DEFAULT_CONFIG,
                       working_dir: str | Path = REPO_ROOT) -> dict:
    """The application entry of serve/config.yaml with this checkout as working_dir and the given overrides.

    `deployments` maps a deployment name to options merged over the file's (user_config merged key by key).
    `token` / `admin_token` reach every replica as their sha256 in runtime_env.env_vars (serve/auth.py).
    """
    config = load_config(config_path)
    app = dict(config["applications"][0])
    app.update(name=name, route_prefix=route_prefix)
    app["args"] = {**app.get("args", {}), "store_url": str(store_url), **(args or {})}
    runtime_env = dict(app.get("runtime_env") or {})
    runtime_env["working_dir"] = f"local://{Path(working_dir).resolve()}"
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env_vars(token, admin_token)}
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


def check_auth(app: dict, host: str, port: int) -> Auth:
    """The tokens an application entry gives its replicas (a "${VAR}" expanded from this environment, as Ray
    expands it on the nodes): InsecureBindError for an open non-loopback bind; says, as a warning, when auth is off.
    The Ingress replicas check the same again on their own runtime environment."""
    expanded = {key: os.path.expandvars(str(value)) for key, value in (app.get("runtime_env") or {}).get(
        "env_vars", {}).items()}
    auth = Auth.from_env({key: value for key, value in expanded.items() if "${" not in value})
    auth.require_safe_bind(host)
    (log.warning if auth.off else log.info)("%s", auth.notice(f"http://{host}:{port}"))
    return auth


def start(store_url: str, *, host: str = "127.0.0.1", port: int = 8000, name: str = DEFAULT_APP_NAME,
          route_prefix: str = "/", token: str | None = None, admin_token: str | None = None, args: dict | None = None,
          deployments: dict[str, dict] | None = None, config_path: str | Path = DEFAULT_CONFIG,
          timeout_s: float = 300.0) -> str:
    """Deploy the application from serve/config.yaml (declaratively, as `serve deploy` does, so versions
    can be swapped in place) on the connected Ray cluster; returns the base URL once it is RUNNING.

    Starts Serve with the config's http_options (request timeout...) on host:port if it is not running.
    Everything else the controller holds is kept (see `redeploy`). `token` protects the API, `admin_token`
    /v1/admin/* (only their sha256 reach the cluster). Refuses (InsecureBindError) a non-loopback host without a
    token, before anything starts; says at start, as a warning, when auth is off.
    """
    import ray
    from ray import serve

    app = application_config(store_url, name=name, route_prefix=route_prefix, token=token, admin_token=admin_token,
                             args=args, deployments=deployments, config_path=config_path)
    check_auth(app, host, port)
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={**(load_config(config_path).get("http_options") or {}), "host": host, "port": port})
    redeploy(name, lambda current: app)
    deadline = time.monotonic() + timeout_s
    status = "NOT_STARTED"
    while time.monotonic() < deadline:
        status = app_status(name)
        if status == "RUNNING":
            break
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {name!r} failed to deploy: {(_application(name) or {}).get('message')}")
        time.sleep(0.5)
    else:
        raise TimeoutError(f"application {name!r} not running after {timeout_s:.0f}s (status {status})")
    _client().wait_for_proxies_serving(wait_for_applications_running=True)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
