"""The serving application on real Ray Serve with the real small models (EfficientNet-Lite0, SmolLM2-135M,
all-MiniLM-L6-v2): the API, bad input, the API and admin tokens, the deployment config (autoscaling, the cap on
in-flight work, the request timeout), and version swaps under load across Captioner replicas that autoscaling adds.

One application is started for the whole module (from serve/config.yaml, as `serve deploy` would) on a
store this module publishes into. Test versions use disjoint class lists, different random projections and
(from version 1 on) different random class statistics for the fused rule, while version 0 records the plain
`trie` rule, so a response that paired one version's projection with another's classes, rule or statistics
would show: every response is checked against the prediction computed here, in the test process, with
`gmm_model.classify.classify`, for the version and rule it names.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import httpx
import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image
from ray import serve

from cil_platform.paths import DATA_DIR, REPO_ROOT
from cil_platform.storage.store import ProjectionStore
from gmm_model import ModelStack, Projection
from gmm_model.classify import ClassifierStats
from serve.settings import CaptionerConfig
from tests.ray_cluster import free_port

pytestmark = pytest.mark.e2e

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_TOKEN = "test-admin-token-51c9"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_BYTES = 64 * 1024
MAX_PIXELS = 256 * 256
POLL_S = 1.0
NAMES = [str(n) for n in np.load(DATA_DIR / "quickdraw345.npz")["class_names"]]
CLASSES = {v: NAMES[8 * v: 8 * v + 8] for v in range(10)}  # disjoint class lists per version
FINGERPRINT = ModelStack().fingerprint
FUSED = "trie+prior+prototypes"
RULES = {0: "trie"}  # the rule each version records; every other version: FUSED


def drawing_png(index: int) -> bytes:
    """A QuickDraw drawing as the training pipeline sees it: ink 255 on 0 inverted, three channels."""
    images = np.load(DATA_DIR / "quickdraw345.npz")["images"]
    rgb = np.repeat((255 - images[index, 0])[..., None], 3, axis=-1)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


IMAGES = [drawing_png(3), drawing_png(40)]


def weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return Projection(1280, 576).to_bytes()


def rule_of(version: int) -> str:
    return RULES.get(version, FUSED)


def class_stats(version: int) -> ClassifierStats:
    """What the version publishes: nothing for `trie`; a random prior and random unit prototypes otherwise."""
    if rule_of(version) == "trie":
        return ClassifierStats()
    generator = torch.Generator().manual_seed(200 + version)
    n = len(CLASSES[version])
    return ClassifierStats(first_token_prior=torch.randn(n, generator=generator) - 3.0,
                           prototypes=torch.nn.functional.normalize(torch.randn(n, 1280, generator=generator), dim=1))


def publish(store: ProjectionStore, version: int, fingerprint: str = FINGERPRINT):
    stats = class_stats(version)
    return store.publish(version, weights(100 + version), CLASSES[version], fingerprint, rule=rule_of(version),
                         class_stats=stats.to_bytes() if rule_of(version) != "trie" else None)


@dataclass
class Server:
    url: str
    store: ProjectionStore

    def classify(self, image: bytes = IMAGES[0], *, top_k: int = 8, headers=None, client=None, **params):
        post = (client or httpx).post
        return post(f"{self.url}/v1/classify", content=image, params={"top_k": top_k, **params},
                    headers={"Content-Type": "image/png", **AUTH, **(headers or {})}, timeout=120)

    def served(self) -> int:
        response = httpx.get(f"{self.url}/v1/model", headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["version"]

    def wait_served(self, version: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.served() != version:
            assert time.monotonic() < deadline, f"version {version} not served after {timeout_s}s"
            time.sleep(0.25)


@contextmanager
def serving(store: ProjectionStore, **start_options):
    """The app from serve/config.yaml on `store`, on a fresh local Ray (never a `ray start` cluster), HTTP on a free
    127.0.0.1 port with the test token; yields its URL and shuts Serve and Ray down after."""
    from serve.deploy import start

    if ray.is_initialized():  # another module's session-scoped cluster: start clean
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield start(store.url, port=free_port(), token=TOKEN, admin_token=ADMIN_TOKEN, **start_options)
    finally:
        serve.shutdown()
        ray.shutdown()


SERVER_ARGS = {"max_image_bytes": MAX_BYTES, "max_image_pixels": MAX_PIXELS}
# small caps, so that a burst of 30 requests passes them (but 6 clients, even while the router still counts the
# burst, do not); a Captioner replica more as soon as 2 requests wait on average (and kept for the rest of the
# module), so that a swap under load runs across two replicas
SERVER_DEPLOYMENTS = {
    "Watcher": {"user_config": {"poll_interval_s": POLL_S}},
    "Captioner": {"max_ongoing_requests": 8, "max_queued_requests": 8,
                  "autoscaling_config": {"target_ongoing_requests": 2, "upscale_delay_s": 1, "look_back_period_s": 11,
                                         "downscale_delay_s": 3600}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    store = ProjectionStore(str(tmp_path_factory.mktemp("serve") / "store"))
    publish(store, 0)
    with serving(store, args=SERVER_ARGS, deployments=SERVER_DEPLOYMENTS) as url:
        yield Server(url, store)


@pytest.fixture(scope="module")
def offline():
    """The served stack's encoder and frozen LLM, loaded here in the test process, and each version's GMM."""
    from gmm_model import GMM, create_encoder, create_gmm

    torch.set_num_threads(1)
    stack = ModelStack()
    encoder = create_encoder(stack)
    base = create_gmm(stack, encoder.width, os.environ.get("GMM_CIL_CACHE", os.path.expanduser("~/.cache/gmm-cil")))

    def gmm(version: int, projection: bytes | None = None) -> GMM:
        projection = weights(100 + version) if projection is None else projection
        return GMM(base.llm, base.tokenizer, Projection(1280, 576).load_bytes(projection), stack.prompt)

    return encoder, gmm


def encoded(encoder, images: list[bytes]) -> torch.Tensor:
    """The encoder's tokens rounded through float16, as the service (and the feature cache) has them."""
    from serve.inputs import decode_image

    return encoder.encode([decode_image(image, MAX_PIXELS) for image in images]).half().float()


@pytest.fixture(scope="module")
def reference(offline):
    """Expected (label, score) of each test image under each version and rule, computed here with `classify`."""
    from gmm_model.classify import classify

    encoder, gmm = offline
    visual = encoded(encoder, IMAGES)
    cache: dict[tuple[int, str], list[tuple[str, float]]] = {}

    def expected(version: int, rule: str | None = None) -> list[tuple[str, float]]:
        rule = rule or rule_of(version)
        if (version, rule) not in cache:
            cache[version, rule] = [(p.label, p.score) for p in classify(gmm(version), visual, CLASSES[version], rule,
                                                                         class_stats(version), top_k=8)]
        return cache[version, rule]

    return expected


def check_consistent(body: dict, image_index: int, reference, rule: str | None = None) -> None:
    """The response is exactly what its version's projection and statistics say over its version's classes,
    with the version's own rule unless the request asked for `rule`."""
    version = body["version"]
    assert body["task"] == version
    assert body["rule"] == (rule or rule_of(version))
    classes = CLASSES[version]
    assert body["label"] in classes
    assert [e["label"] for e in body["top_k"]][0] == body["label"]
    assert {e["label"] for e in body["top_k"]} == set(classes)  # top_k = all 8 classes of that version
    label, score = reference(version, rule)[image_index]
    assert body["label"] == label and body["score"] == pytest.approx(score, abs=2e-2), (body, label, score)


def serve_details():
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_get_global_client().get_serve_details()).applications["gmm-cil"]


# ---- the API ------------------------------------------------------------------------------------------

def test_healthz_needs_no_token(server):
    response = httpx.get(f"{server.url}/healthz", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_info(server):
    response = httpx.get(f"{server.url}/v1/model", headers=AUTH, timeout=30)
    assert response.status_code == 200
    info = response.json()
    assert info["version"] == 0 and info["task"] == 0 and info["seen_classes"] == CLASSES[0]
    assert info["stack_fingerprint"] == FINGERPRINT
    assert info["rule"] == "trie" and info["rules"] == ["free", "trie"]  # version 0 has no class statistics


def test_classify_raw_bytes_and_multipart(server, reference):
    raw = server.classify(IMAGES[0])
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) >= {"label", "score", "text", "top_k", "version", "task"}
    assert body["text"] == f"This is a photo of a {body['label']}."
    check_consistent(body, 0, reference)

    upload = httpx.post(f"{server.url}/v1/classify", params={"top_k": 8}, headers=AUTH, timeout=120,
                        files={"file": ("drawing.png", IMAGES[1], "image/png")})
    assert upload.status_code == 200, upload.text
    check_consistent(upload.json(), 1, reference)

    top2 = server.classify(IMAGES[0], top_k=2).json()
    assert len(top2["top_k"]) == 2 and top2["label"] == body["label"]
    default = httpx.post(f"{server.url}/v1/classify", content=IMAGES[0], timeout=120,
                         headers={"Content-Type": "image/png", **AUTH}).json()
    assert len(default["top_k"]) == 1


def test_free_rule_goes_through_the_matcher(server):
    response = server.classify(IMAGES[1], top_k=3, rule="free")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rule"] == "free" and body["version"] == 0 and body["label"] in CLASSES[0]
    assert body["text"]  # what the LLM wrote; the matcher mapped it to a class
    scores = [e["score"] for e in body["top_k"]]
    assert len(scores) == 3 and all(-1.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)


def test_describe_continues_after_the_kept_label(server, offline):
    """describe=true: the label and answer are what the trie decoded (unchanged), and the description is exactly
    what `classify(..., describe_tokens=N)` writes after that answer in the test process, within the bound."""
    from gmm_model.classify import classify

    encoder, gmm = offline
    bound = CaptionerConfig().description_tokens
    plain = server.classify(IMAGES[1], top_k=3).json()
    response = server.classify(IMAGES[1], top_k=3, describe="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 0 and body["rule"] == "trie"
    same = [k for k in plain if k not in ("generation", "replica")]  # the Watcher's first poll may pin meanwhile
    assert {k: body[k] for k in same} == {k: plain[k] for k in same}  # label, score, text, top-k: as without it
    assert "description" not in plain and isinstance(body["description_complete"], bool)
    expected = classify(gmm(0), encoded(encoder, IMAGES[1:]), CLASSES[0], "trie", describe_tokens=bound)[0]
    assert expected.label == body["label"]
    assert body["description"] == expected.description.text and body["description"]
    assert body["description_complete"] == expected.description.ended
    assert expected.description.tokens <= bound and (expected.description.ended or expected.description.tokens == bound)


def test_describe_with_the_free_rule_continues_the_models_own_text(server, offline):
    encoder, gmm = offline
    body = server.classify(IMAGES[0], top_k=2, rule="free", describe="true").json()
    assert body["rule"] == "free" and body["label"] in CLASSES[0]
    model = gmm(0)
    answer = model.tokenizer(body["text"], add_special_tokens=False).input_ids
    expected = model.continue_answers(encoded(encoder, IMAGES[:1]), [answer], CaptionerConfig().description_tokens)[0]
    assert body["description"] == expected.text and body["description_complete"] == expected.ended


def chunked(data: bytes):
    yield data[: len(data) // 2]
    yield data[len(data) // 2:]


def bad_requests(url: str) -> list[tuple[str, dict, int]]:
    """(name, httpx.post kwargs, expected status)."""
    classify = f"{url}/v1/classify"
    png = IMAGES[0]
    big = np.random.default_rng(0).integers(0, 255, MAX_BYTES + 10, dtype=np.uint8).tobytes()
    out = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(out, format="PNG")  # 90,000 px > MAX_PIXELS
    many_pixels = out.getvalue()

    def raw(body, ctype="image/png", **params):
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        return {"url": classify, "content": body, "headers": headers, "params": params}

    def form(files):
        return {"url": classify, "files": files, "headers": AUTH}

    return [
        ("empty body", raw(b""), 400),
        ("not an image", raw(b"certainly not a png"), 400),
        ("truncated png", raw(png[: len(png) // 2]), 400),
        ("text content type", raw(png, "text/plain"), 415),
        ("json content type", raw(b'{"image": 1}', "application/json"), 415),
        ("octet-stream", raw(png, "application/octet-stream"), 415),
        ("no content type", raw(png, None), 415),
        ("too many bytes", raw(big), 413),
        ("too many bytes, chunked", raw(chunked(big)), 413),
        ("too many pixels", raw(many_pixels), 413),
        ("top_k zero", raw(png, top_k=0), 422),
        ("top_k not a number", raw(png, top_k="many"), 422),
        ("top_k over the limit", raw(png, top_k=10_000), 422),
        ("unknown rule", raw(png, rule="beam"), 422),
        ("describe not a boolean", raw(png, describe="perhaps"), 422),
        ("rule without its statistics", raw(png, rule="trie+prior"), 422),  # version 0 published none
        ("multipart without file", form({"image": ("a.png", png, "image/png")}), 400),
        ("multipart field, no file", form({"file": (None, b"just a string")}), 400),
        ("multipart text file", form({"file": ("a.txt", b"hello", "text/plain")}), 415),
        ("multipart not an image", form({"file": ("a.png", b"garbage", "image/png")}), 400),
        ("multipart too large", form({"file": ("a.png", big, "image/png")}), 413),
    ]


def test_bad_input_is_a_4xx_with_a_message(server):
    failures = []
    for name, kwargs, status in bad_requests(server.url):
        response = httpx.post(timeout=60, **{k: v for k, v in kwargs.items() if v is not None})
        detail = response.json().get("detail") if response.headers.get("content-type") == "application/json" else None
        if response.status_code != status or not detail:
            failures.append(f"{name}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert server.classify(IMAGES[0]).status_code == 200  # and the service is still fine


@pytest.mark.parametrize("method, path", [("GET", "/v1/model"), ("POST", "/v1/classify"),
                                          ("POST", "/v1/admin/reload")])
def test_token_protects_everything_but_healthz(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.request(method, f"{server.url}{path}", headers={"Content-Type": "image/png", **headers},
                                 content=IMAGES[0] if method == "POST" else None, timeout=30)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"


def test_the_admin_api_needs_the_admin_token(server):
    """The API token classifies but cannot move the served version; the admin token can do both."""
    reload = f"{server.url}/v1/admin/reload"
    refused = httpx.post(reload, json={"version": 0}, headers=AUTH, timeout=30)
    assert refused.status_code == 403 and "admin token" in refused.json()["detail"]
    assert server.classify(IMAGES[0], headers=ADMIN).status_code == 200
    assert httpx.get(f"{server.url}/v1/model", headers=ADMIN, timeout=30).status_code == 200
    too_big = httpx.post(reload, content=b"{" + b" " * 10_000 + b"}", headers=ADMIN, timeout=30)
    assert too_big.status_code == 413 and "4096" in too_big.json()["detail"]  # bounded before it is read
    assert server.served() == 0


def test_the_tokens_reach_every_replica_as_hashes_through_the_runtime_env(server):
    from serve.auth import ADMIN_TOKEN_ENV, TOKEN_ENV, digest

    config = serve_details().deployed_app_config.model_dump(exclude_unset=True)
    env = config["runtime_env"]["env_vars"]
    assert env[f"{TOKEN_ENV}_SHA256"] == digest(TOKEN) and env[f"{ADMIN_TOKEN_ENV}_SHA256"] == digest(ADMIN_TOKEN)
    shown = json.dumps(config)
    assert TOKEN not in shown and ADMIN_TOKEN not in shown  # the controller (and dashboard) see hashes only
    assert not {"token_sha256", "token_env"} & set(config["args"])


# ---- deployment config --------------------------------------------------------------------------------

def test_the_deployment_config_is_what_the_controller_runs(server):
    """serve/config.yaml with this module's overrides (application_config: what start() deployed): autoscaling,
    resources, the cap on in-flight work (max_ongoing + max_queued), one Ingress replica, the request timeout."""
    from serve.deploy import application_config, load_config

    declared = {d["name"]: d for d in application_config(server.store.url, args=SERVER_ARGS,
                                                         deployments=SERVER_DEPLOYMENTS)["deployments"]}
    app = serve_details()
    assert app.status == "RUNNING"
    for name in ("Ingress", "Captioner", "Matcher"):
        deployment = app.deployments[name]
        config = deployment.deployment_config
        assert config.ray_actor_options.num_cpus == declared[name]["ray_actor_options"]["num_cpus"]
        assert config.max_ongoing_requests == declared[name]["max_ongoing_requests"]
        assert config.max_queued_requests == declared[name]["max_queued_requests"] > 0, name
        if "autoscaling_config" not in declared[name]:
            continue
        live = config.autoscaling_config
        live = live if isinstance(live, dict) else live.model_dump()
        for key, value in declared[name]["autoscaling_config"].items():
            assert live[key] == value, (name, key)
        low, high = live["min_replicas"], live["max_replicas"]
        assert low <= deployment.target_num_replicas <= high
        assert low <= sum(r.state == "RUNNING" for r in deployment.replicas) <= high
    # the Ingress orders answers across Captioner replicas: exactly one
    assert declared["Ingress"]["num_replicas"] == 1 and app.deployments["Ingress"].target_num_replicas == 1
    assert app.deployments["Watcher"].target_num_replicas == 1
    assert app.deployments["Captioner"].deployment_config.user_config["max_batch_size"] == 8
    from ray.serve.context import _get_global_client

    timeout = load_config()["http_options"]["request_timeout_s"]
    assert 0 < timeout <= 300 and _get_global_client().http_config.request_timeout_s == timeout


# ---- version swaps ------------------------------------------------------------------------------------

class Load:
    """Closed-loop clients: each thread sends its next request when the previous one is answered."""

    def __init__(self, server: Server, threads: int = 4):
        self.server, self.stop = server, threading.Event()
        self.results: list[tuple[float, float, int, int, dict | str]] = []  # start, end, image, status, body
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        with httpx.Client() as client:
            n = 0
            while not self.stop.is_set():
                image = (index + n) % len(IMAGES)
                n += 1
                started = time.monotonic()
                try:
                    response = self.server.classify(IMAGES[image], client=client)
                    status = response.status_code
                    body = response.json() if status == 200 else response.text
                except Exception as error:  # a failed request is a result too
                    status, body = -1, repr(error)
                with self.lock:
                    self.results.append((started, time.monotonic(), image, status, body))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def captioner_replicas() -> set[str]:
    return {r.replica_id for r in serve_details().deployments["Captioner"].replicas}


def running_captioners() -> list[str]:
    from serve.deploy import running_replicas

    return running_replicas("gmm-cil")


def order(body: dict) -> tuple[int, int]:
    return body["generation"], body["version"]


def causal_violations(results) -> list:
    """Pairs (earlier, later) where a request sent after another's answer had arrived got an older version: once
    any client has seen generation N, no later answer may be older."""
    answered = sorted((end, order(body)) for _, end, _, status, body in results if status == 200)
    out, newest, i = [], None, 0
    for start, _, _, status, body in sorted(results, key=lambda r: r[0]):
        while i < len(answered) and answered[i][0] < start:
            newest = max(newest, answered[i][1]) if newest is not None else answered[i][1]
            i += 1
        if status == 200 and newest is not None and order(body) < newest:
            out.append((newest, order(body), start))
    return out


def test_a_burst_beyond_the_in_flight_cap_is_503_not_queued_without_bound(server):
    """30 requests at once against 8 ongoing per Captioner replica + 8 queued: the rest is refused at once with
    503, a JSON message and Retry-After, never a 500; every admitted one is answered. (The burst also makes the
    autoscaler add a Captioner replica, which the next test uses.)"""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(lambda _: server.classify(IMAGES[0], top_k=1), range(30)))
    statuses = [r.status_code for r in responses]
    busy = [r for r in responses if r.status_code == 503]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8 and busy, statuses
    for response in busy:
        assert "busy" in response.json()["detail"] and response.headers["retry-after"] == "1"
    assert server.classify(IMAGES[0]).status_code == 200


def test_swap_across_autoscaled_replicas_under_load(server, reference):
    """Six closed-loop clients make the autoscaler run two Captioner replicas; then version 1 is published and
    announced. Every answer names its version and weights' sha256 and is what that version predicts; no answer is
    older than one any client had already received; the announcement settles only with both replicas on
    version 1, and names them; both replicas answered; none was replaced (reconfigured in place)."""
    from serve.client import announce

    reference(0), reference(1)  # computed up front, not while the load runs
    before = captioner_replicas()
    with Load(server, threads=6) as load:
        deadline = time.monotonic() + 240
        while len(running_captioners()) < 2:
            assert time.monotonic() < deadline, "the autoscaler did not add a second Captioner replica"
            time.sleep(1)
        time.sleep(2)
        publish(server.store, 1)
        announced = announce(server.url, 1, ADMIN_TOKEN)
        done = time.monotonic()
        time.sleep(3)
    sha = {v: server.store.manifest(v).sha256 for v in (0, 1)}
    assert announced["version"] == 1 and announced["task"] == 1 and announced["rule"] == FUSED
    assert announced["settled"] is True and announced["failed"] == [] and announced["sha256"] == sha[1]
    assert announced["previous"] in (0, 1)  # the store poller may have seen version 1 first
    assert announced["replicas"] == running_captioners() and len(announced["replicas"]) == 2

    failed = [r for r in load.results if r[3] != 200]
    assert not failed, failed[:5]
    for _, _, image, _, body in load.results:
        check_consistent(body, image, reference)
        assert body["sha256"] == sha[body["version"]]
    assert not causal_violations(load.results), causal_violations(load.results)[:5]
    versions = [body["version"] for *_, body in sorted(load.results)]
    assert versions[0] == 0 and versions[-1] == 1
    assert all(body["version"] == 1 and body["generation"] >= announced["generation"]
               for start, _, _, _, body in load.results if start > done)
    assert len({body["replica"] for *_, body in load.results}) == 2  # both replicas answered
    assert len(load.results) >= 8
    assert before <= captioner_replicas()  # swapped in place: no replica was replaced
    assert server.served() == 1


def test_status_reads_are_safe_beside_a_schema_build_in_another_thread(server):
    """The Watcher reads the app's status in one thread while another builds Serve's schemas to apply a version;
    Ray's schema construction is not thread-safe, so the reads must not build schemas (an announce once got a
    500: "... is not registered for pickle by value")."""
    from concurrent.futures import ThreadPoolExecutor

    from serve import deploy

    stop = threading.Event()

    def build_schemas() -> int:
        count = 0
        while not stop.is_set():
            serve_details()  # what set_served_version does before it deploys
            count += 1
        return count

    def read_status() -> int:
        try:
            for _ in range(150):
                assert deploy.app_status("gmm-cil") == "RUNNING"
                deploy.served_version("gmm-cil")
            return 150
        finally:
            stop.set()

    with ThreadPoolExecutor(2) as pool:
        builds, reads = pool.submit(build_schemas), pool.submit(read_status)
        assert reads.result(timeout=300) == 150 and builds.result(timeout=300) > 0


def test_the_store_is_polled_for_new_versions(server, reference):
    assert server.served() == 1
    publish(server.store, 2)
    server.wait_served(2, timeout_s=30)
    response = server.classify(IMAGES[1])
    assert response.status_code == 200
    check_consistent(response.json(), 1, reference)


def test_a_request_may_ask_for_any_rule_the_version_has_statistics_for(server, reference):
    assert server.served() == 2
    info = httpx.get(f"{server.url}/v1/model", headers=AUTH, timeout=30).json()
    assert info["rule"] == FUSED
    assert info["rules"] == ["free", "trie", "trie+prior", "trie+prototypes", "trie+prior+prototypes"]
    for rule in ("trie", "trie+prior", "trie+prototypes"):
        response = server.classify(IMAGES[0], rule=rule)
        assert response.status_code == 200, response.text
        check_consistent(response.json(), 0, reference, rule)


def test_an_announced_roll_back_stays_until_a_newer_version(server, reference):
    from serve.client import announce_version

    result = announce_version(serve.get_app_handle("gmm-cil"), 0)  # in-cluster, through a handle
    assert result["version"] == 0 and result["previous"] == 2 and result["settled"]
    assert server.served() == 0
    time.sleep(3 * POLL_S)
    assert server.served() == 0  # the poller does not undo the roll-back to re-serve version 2
    check_consistent(server.classify(IMAGES[0]).json(), 0, reference)
    publish(server.store, 3)
    server.wait_served(3, timeout_s=30)  # but a newer version moves the app on


def test_unusable_versions_are_refused(server):
    from serve.client import AnnounceError, announce

    with pytest.raises(AnnounceError) as missing:
        announce(server.url, 99, ADMIN_TOKEN)
    assert missing.value.status == 404

    publish(server.store, 4, fingerprint="0123456789ab")  # trained for another model stack
    with pytest.raises(AnnounceError) as other_stack:
        announce(server.url, 4, ADMIN_TOKEN)
    assert other_stack.value.status == 409 and "stack" in other_stack.value.detail

    publish(server.store, 5)
    weights_file = Path(server.store.root) / "v0005" / "projection.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: the sha256 in the manifest no longer matches
    weights_file.write_bytes(bytes(data))
    with pytest.raises(AnnounceError) as corrupt:
        announce(server.url, 5, ADMIN_TOKEN)
    assert corrupt.value.status == 409 and "sha256" in corrupt.value.detail

    publish(server.store, 6)
    stats_file = Path(server.store.root) / "v0006" / "class_stats.safetensors"
    data = bytearray(stats_file.read_bytes())
    data[-1] ^= 0xFF  # the class statistics are checked like the weights
    stats_file.write_bytes(bytes(data))
    with pytest.raises(AnnounceError) as corrupt_stats:
        announce(server.url, 6, ADMIN_TOKEN)
    assert corrupt_stats.value.status == 409 and "class_stats" in corrupt_stats.value.detail

    time.sleep(3 * POLL_S)  # the poller saw versions 4 to 6 as the latest and refused them too
    assert server.served() == 3
    assert server.classify(IMAGES[0]).json()["version"] == 3

    for body in (b'{"version": -1}', b"not json", b'{"version": 1, "colour": "red"}', b"\x89PNG\r\n"):
        bad = httpx.post(f"{server.url}/v1/admin/reload", content=body, headers=ADMIN, timeout=30)
        assert bad.status_code == 422 and bad.json()["detail"], body


def test_a_republished_version_is_told_apart_by_its_sha(server, offline):
    """Announcing the served version again is a newer generation of the same weights; version 3 removed and
    published again with other weights (what the store's create-only rule asks of a re-run) is loaded by every
    replica, and every answer names the new weights' sha256 and is what they predict."""
    from gmm_model.classify import classify
    from serve.client import announce

    old = server.store.manifest(3)
    first = server.classify(IMAGES[0]).json()
    assert first["version"] == 3 and first["sha256"] == old.sha256
    again = announce(server.url, 3, ADMIN_TOKEN)  # re-loaded: the same weights
    assert again["settled"] and again["sha256"] == old.sha256 and again["generation"] > first["generation"]

    shutil.rmtree(Path(server.store.root) / "v0003")
    torch.manual_seed(999)
    other = Projection(1280, 576).to_bytes()
    new = server.store.publish(3, other, CLASSES[3], FINGERPRINT, rule=FUSED, class_stats=class_stats(3).to_bytes())
    assert new.sha256 != old.sha256
    moved = announce(server.url, 3, ADMIN_TOKEN)
    assert moved["settled"] and moved["sha256"] == new.sha256 and moved["generation"] > again["generation"]
    assert len(moved["replicas"]) == 2 and moved["failed"] == []

    encoder, gmm = offline
    expected = classify(gmm(3, other), encoded(encoder, IMAGES[:1]), CLASSES[3], FUSED, class_stats(3), top_k=8)[0]
    for _ in range(4):  # both replicas (the router spreads requests)
        body = server.classify(IMAGES[0]).json()
        assert body["version"] == 3 and body["sha256"] == new.sha256 and body["generation"] >= moved["generation"]
        assert body["label"] == expected.label and body["score"] == pytest.approx(expected.score, abs=2e-2)
    info = httpx.get(f"{server.url}/v1/model", headers=AUTH, timeout=30).json()
    assert info["sha256"] == new.sha256 and info["version"] == 3


def test_a_version_no_replica_can_load_is_refused_naming_each_replica(server):
    """Version 7's statistics have a row too many: the Watcher's file checks pass, every Captioner replica refuses
    it when loading. The announcement does not settle: 409, naming each replica and why; the app moves back, keeps
    answering with version 3 and polling does not try 7 again."""
    n = len(CLASSES[7])
    generator = torch.Generator().manual_seed(7)
    wrong = ClassifierStats(first_token_prior=torch.randn(n + 1, generator=generator),
                            prototypes=torch.nn.functional.normalize(torch.randn(n + 1, 1280, generator=generator), dim=1))
    server.store.publish(7, weights(107), CLASSES[7], FINGERPRINT, rule=FUSED, class_stats=wrong.to_bytes())
    sha3 = server.store.manifest(3).sha256
    response = httpx.post(f"{server.url}/v1/admin/reload", json={"version": 7}, headers=ADMIN, timeout=300)
    assert response.status_code == 409, response.text
    body = response.json()
    assert "no Captioner replica could load version 7" in body["detail"]
    replicas = running_captioners()
    assert len(replicas) == 2 and sorted(f["replica"] for f in body["failed"]) == replicas
    assert all(f["error"] and f["replica"] in body["detail"] for f in body["failed"])
    time.sleep(3 * POLL_S)
    for _ in range(3):
        answer = server.classify(IMAGES[0]).json()
        assert answer["version"] == 3 and answer["sha256"] == sha3
    assert server.served() == 3


def test_the_poller_falls_back_past_a_damaged_newest_version(server, reference, tmp_path):
    """Version 9 arrives damaged (its weights do not match their sha256) together with a good version 8: the app
    serves 8, the newest good one, instead of staying on 3 until a newer good version comes."""
    scratch = ProjectionStore(str(tmp_path / "scratch"))
    publish(scratch, 8)
    publish(scratch, 9)
    damaged = Path(scratch.root) / "v0009" / "projection.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for version in (9, 8):  # the damaged one first: the app never sees a newest version that is intact
        shutil.copytree(Path(scratch.root) / f"v{version:04d}", Path(server.store.root) / f"v{version:04d}")
    server.wait_served(8, timeout_s=60)
    body = server.classify(IMAGES[0]).json()
    assert body["version"] == 8 and body["sha256"] == server.store.manifest(8).sha256
    check_consistent(body, 0, reference)
