"""Start the serving application from serve/config.yaml with this checkout as its code, and keep it up.

    python -m serve.launch --store runs/demo/store                   # a local Ray instance, HTTP on 127.0.0.1:8000
    python -m serve.launch --store s3://bucket/store --address auto  # an existing cluster (`ray start --head`)
    GMM_CIL_SERVE_TOKEN=... GMM_CIL_SERVE_ADMIN_TOKEN=... python -m serve.launch --store ...
                                # the API token, and the admin token for /v1/admin/* (without one it is closed)
    python -m serve.launch --store ... --host 0.0.0.0                # refused without GMM_CIL_SERVE_TOKEN

Unlike `serve run serve/config.yaml`, the config's working_dir need not be edited: it is set to this checkout.
`--set Deployment.key=value` overrides one deployment option (user_config keys too, e.g.
`--set Watcher.user_config.poll_interval_s=2`, `--set Captioner.autoscaling_config.max_replicas=4`).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable, not serve/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def parse_sets(assignments: list[str]) -> dict[str, dict]:
    """['Watcher.user_config.poll_interval_s=2'] -> {'Watcher': {'user_config': {'poll_interval_s': 2}}}
    (cil_platform.config.apply_override, the experiments' own `--set` parser: values are YAML)."""
    if not assignments:
        return {}
    from cil_platform.config import apply_override

    out: dict[str, dict] = {}
    for assignment in assignments:
        key, sep, _ = assignment.partition("=")
        if not sep or len(key.split(".")) < 2 or not all(part.strip() for part in key.split(".")):
            raise SystemExit(f"--set expects Deployment.option=value, got {assignment!r}")
        try:
            apply_override(out, assignment)
        except ValueError as error:  # e.g. a.b=1 then a.b.c=2: b is a value, not a section
            raise SystemExit(f"--set: {error}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    from serve.settings import ADMIN_TOKEN_ENV, DEFAULT_APP_NAME, TOKEN_ENV

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="projection store URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="Ray cluster address; default: start a local instance")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local instance")
    parser.add_argument("--name", default=DEFAULT_APP_NAME, help="application name")
    parser.add_argument("--token-env", default=TOKEN_ENV, help="environment variable with the API token")
    parser.add_argument("--admin-token-env", default=ADMIN_TOKEN_ENV,
                        help="environment variable with the admin token (/v1/admin/*)")
    parser.add_argument("--config", default=None, help="config file (default serve/config.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="DEPLOYMENT.KEY=VALUE")
    args = parser.parse_args(argv)
    deployments = parse_sets(args.sets)  # a bad --set fails before Ray starts

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve.auth import Auth, InsecureBindError, env_vars
    from serve.deploy import DEFAULT_CONFIG, start

    token, admin_token = os.environ.get(args.token_env) or None, os.environ.get(args.admin_token_env) or None
    try:
        auth = Auth.from_env(env_vars(token, admin_token))
        auth.require_safe_bind(args.host)  # before Ray starts
    except (InsecureBindError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if not auth.off:  # when it is off, start() warns
        print(auth.notice(f"http://{args.host}:{args.port}"), flush=True)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    url = start(args.store, host=args.host, port=args.port, name=args.name, token=token, admin_token=admin_token,
                deployments=deployments, config_path=args.config or DEFAULT_CONFIG)
    print(f"GMM-CIL serving at {url}  (playground {url}/, POST {url}/v1/classify, GET {url}/v1/model; "
          "Ctrl-C stops)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if not args.address:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
