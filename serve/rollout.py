"""Move a running application to another model version through Serve's own user_config route.

The version a deployment serves is a key of its `user_config`. Changing it is exactly what
`serve deploy serve/config.yaml` does when only a user_config differs: the controller keeps the code
version (import path, args and runtime_env are unchanged), so it calls `reconfigure` on every live
replica in place — no restart, no new process — and hands the same user_config to every replica that
autoscaling starts later. This module makes that change from inside the cluster: it reads the
declarative config the controller holds, edits the `version` of the deployments that carry one,
and applies the whole config again (other declaratively deployed applications are passed through
unchanged, since applying a config deletes the declarative applications it does not name).

This needs an application deployed from a config (`serve deploy` / `serve run serve/config.yaml` /
`serve.app.start`); an application deployed with `serve.run(app)` from Python has no such config.
"""
from __future__ import annotations

import time
from typing import Any

VERSIONED_DEPLOYMENTS = ("Captioner", "Matcher")


class NotDeclarativeError(RuntimeError):
    """The application was not deployed from a config, so there is no user_config to edit."""


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def _details():
    """The whole instance as Serve's schema. Only for set_served_version, whose callers serialise it (the
    Watcher's lock): building these schemas is not thread-safe (`ray.serve.config` registers and unregisters
    the autoscaling policy's module with cloudpickle, process-wide), and a status read racing with it failed
    with "... is not registered for pickle by value"."""
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_client().get_serve_details())


def _application(app_name: str) -> dict | None:
    """One application's entry of the controller's plain JSON details (no schema built, so safe from any thread)."""
    return (_client().get_serve_details().get("applications") or {}).get(app_name)


def served_version(app_name: str) -> int | None:
    """The version named in the Captioner's effective user_config (None: the latest at start-up)."""
    app = _application(app_name)
    if app is None:
        raise KeyError(f"no Serve application named {app_name!r}")
    deployment = (app.get("deployments") or {}).get(VERSIONED_DEPLOYMENTS[0]) or {}
    config = (deployment.get("deployment_config") or {}).get("user_config") or {}
    return config.get("version")


def app_status(app_name: str) -> str:
    app = _application(app_name)
    if app is None:
        return "NOT_FOUND"
    status = app.get("status")  # an ApplicationStatus (a str enum) in the controller's dict
    return str(getattr(status, "value", status))


def set_served_version(app_name: str, version: int) -> None:
    """Apply the app's current declarative config again with user_config.version = `version` on the
    Captioner and the Matcher. Returns once the controller has the new target (the app is DEPLOYING)."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    details = _details()
    if app_name not in details.applications:
        raise KeyError(f"no Serve application named {app_name!r}")
    applications = []
    for name, app in details.applications.items():
        config = app.deployed_app_config
        if config is None:
            if name == app_name:
                raise NotDeclarativeError(
                    f"application {app_name!r} was deployed with serve.run() from Python; hot swapping needs "
                    "a config deploy (serve deploy/run serve/config.yaml or serve.app.start)")
            continue  # imperatively deployed apps are not part of the declarative config: left alone
        tree: dict[str, Any] = config.model_dump(exclude_unset=True)
        if name == app_name:
            tree = _with_version(tree, app, version)
        applications.append(ServeApplicationSchema.model_validate(tree))
    fields: dict[str, Any] = {"applications": applications, "target_capacity": details.target_capacity}
    if details.proxy_location is not None:
        fields["proxy_location"] = details.proxy_location
    if details.http_options is not None:
        fields["http_options"] = details.http_options
    if details.grpc_options is not None:
        fields["grpc_options"] = details.grpc_options
    _client().deploy_apps(ServeDeploySchema(**fields))


def _with_version(tree: dict, app, version: int) -> dict:
    deployments = {d["name"]: d for d in tree.get("deployments", [])}
    for name in VERSIONED_DEPLOYMENTS:
        live = app.deployments.get(name)
        current = dict((live.deployment_config.user_config if live else None) or {})
        entry = deployments.setdefault(name, {"name": name})
        entry["user_config"] = {**current, **(entry.get("user_config") or {}), "version": int(version)}
    tree["deployments"] = list(deployments.values())
    return tree


def wait_running(app_name: str, timeout_s: float, poll_s: float = 0.2) -> bool:
    """Wait until the application is RUNNING again (every replica reconfigured); False on time-out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app_status(app_name) == "RUNNING":
            return True
        time.sleep(poll_s)
    return False
