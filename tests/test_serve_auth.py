"""Who may call the serving API, without Ray: the API and admin tokens, failing closed, and how the tokens reach
the replicas (serve/auth.py, serve.deploy.application_config / start, serve.launch). The same rules on the live
app: tests/test_serve.py."""
from __future__ import annotations

import json
import logging

import pytest

from serve.auth import (ADMIN_TOKEN_ENV, TOKEN_ENV, Auth, InsecureBindError, digest, env_vars, is_loopback,
                        scope_of)

API, ADMIN = "api-token-0c1d2e3f", "admin-token-9a8b7c6d"
BOTH = Auth(digest(API), digest(ADMIN))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_paths_fall_in_three_scopes():
    assert [scope_of(p) for p in ("/", "", "/healthz", "/static/playground.js")] == ["public"] * 4
    assert [scope_of(p) for p in ("/v1/classify", "/v1/model", "/v1/modelx", "/docs")] == ["api"] * 4
    assert [scope_of(p) for p in ("/v1/admin/reload", "/v1/admin/anything", "/v1/admin")] == ["admin"] * 3
    assert scope_of("/gmm/v1/admin/reload", "/gmm") == "admin" and scope_of("/gmm/", "/gmm") == "public"


def test_the_api_token_opens_the_api_but_not_the_admin_api():
    assert BOTH.check("api", bearer(API)) is None
    assert BOTH.check("api", bearer(ADMIN)) is None  # the admin token can do what a client can
    assert BOTH.check("admin", bearer(ADMIN)) is None
    status, detail = BOTH.check("admin", bearer(API))
    assert status == 403 and "admin token" in detail  # a client cannot roll production back
    for header in (None, "", "Bearer", "Bearer wrong", API, f"Basic {API}", f"Bearer  {API}x"):
        assert BOTH.check("api", header)[0] == 401, header
        assert BOTH.check("admin", header)[0] == 401, header
    assert BOTH.check("public", None) is None


def test_without_an_admin_token_the_admin_api_is_closed():
    api_only = Auth(digest(API), None)
    status, detail = api_only.check("admin", bearer(API))
    assert status == 403 and ADMIN_TOKEN_ENV in detail
    assert api_only.check("admin", None)[0] == 403
    assert api_only.check("api", bearer(API)) is None and api_only.check("api", None)[0] == 401
    assert "admin API closed" in api_only.notice("http://127.0.0.1:8000")


def test_auth_off_is_open_and_says_so():
    off = Auth()
    assert off.off and off.check("admin", None) is None and off.check("api", None) is None
    notice = off.notice("http://127.0.0.1:8000")
    assert "AUTH IS OFF" in notice and "/v1/admin/*" in notice and "127.0.0.1:8000" in notice


def test_a_non_loopback_address_needs_an_api_token():
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org", "", None):
        with pytest.raises(InsecureBindError, match=TOKEN_ENV):
            Auth().require_safe_bind(host)
        with pytest.raises(InsecureBindError):
            Auth(None, digest(ADMIN)).require_safe_bind(host)  # an admin token alone leaves the API open
        Auth(digest(API), None).require_safe_bind(host)
    for host in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        Auth().require_safe_bind(host)


def test_tokens_resolve_from_the_runtime_environment():
    assert Auth.from_env({}) == Auth()
    assert Auth.from_env({TOKEN_ENV: API, ADMIN_TOKEN_ENV: ADMIN}) == BOTH
    assert Auth.from_env(env_vars(API, ADMIN)) == BOTH  # what the launcher ships: hashes only
    assert Auth.from_env({TOKEN_ENV: "", ADMIN_TOKEN_ENV: "  "}) == Auth()  # "${VAR}" of an unset variable
    hashed_wins = {TOKEN_ENV + "_SHA256": digest(API), TOKEN_ENV: "something else"}
    assert Auth.from_env(hashed_wins).api_sha256 == digest(API)
    assert API not in json.dumps(env_vars(API, ADMIN)) and ADMIN not in json.dumps(env_vars(API, ADMIN))
    with pytest.raises(ValueError, match="64 hex"):
        Auth.from_env({TOKEN_ENV + "_SHA256": "not-a-digest"})
    with pytest.raises(ValueError, match="must differ"):
        Auth.from_env({TOKEN_ENV: API, ADMIN_TOKEN_ENV: API})


def test_the_application_entry_carries_only_the_hashes_in_its_runtime_env():
    from serve.deploy import application_config

    app = application_config("/tmp/store", token=API, admin_token=ADMIN)
    env = app["runtime_env"]["env_vars"]
    assert Auth.from_env(env) == BOTH
    assert API not in json.dumps(app) and ADMIN not in json.dumps(app)
    assert not {"token_sha256", "token_env"} & set(app["args"])
    # serve/config.yaml itself takes the tokens from each node's environment (cluster.yaml sets them)
    assert env[TOKEN_ENV] == "${%s}" % TOKEN_ENV and env[ADMIN_TOKEN_ENV] == "${%s}" % ADMIN_TOKEN_ENV


def test_the_old_token_arguments_are_refused_with_a_message():
    from serve.settings import AppArgs

    with pytest.raises(ValueError, match="runtime_env.env_vars"):
        AppArgs.model_validate({"store_url": "x", "token_sha256": digest(API)})


def test_start_refuses_an_open_non_loopback_bind_before_ray_starts(monkeypatch):
    import ray

    from serve.deploy import start

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert not ray.is_initialized()
    with pytest.raises(InsecureBindError, match="0.0.0.0"):
        start("/tmp/no-store", host="0.0.0.0", admin_token=ADMIN)
    assert not ray.is_initialized()  # refused before anything started


def test_starting_without_a_token_warns_that_auth_is_off(monkeypatch, caplog):
    from serve.deploy import application_config, check_auth

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="serve.deploy"):
        assert check_auth(application_config("/tmp/store"), "127.0.0.1", 8123).off
        assert check_auth(application_config("/tmp/store", token=API), "0.0.0.0", 8124) == Auth(digest(API))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "AUTH IS OFF" in warned[0].message and "127.0.0.1:8123" in warned[0].message
    monkeypatch.setenv(TOKEN_ENV, API)  # the config's "${GMM_CIL_SERVE_TOKEN}", as Ray expands it on a node
    assert check_auth(application_config("/tmp/store"), "0.0.0.0", 8125).api_sha256 == digest(API)


def test_the_launcher_refuses_an_open_non_loopback_bind(monkeypatch, capsys):
    import ray

    from serve.launch import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit, match="refusing to serve on '0.0.0.0'"):
        main(["--store", "/tmp/no-store", "--host", "0.0.0.0"])
    assert not ray.is_initialized()
