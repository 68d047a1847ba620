"""The Captioner deployment: the frozen encoder and LLM, one immutable served version at a time, batched requests.

A version is one store entry. The Captioner turns it into one `ServedVersion`: a GMM sharing the frozen LLM with
that version's projection, its class list, the decoding rule its metrics were measured with (`manifest.rule`) and
the class statistics that rule needs (`class_stats.safetensors`: first-token prior, prototypes, ridge head). They
are swapped together with a single assignment; a batch reads the reference once and is answered entirely by it, so
no response pairs one version's projection with another's classes or statistics, and every response names its
version and rule.

Prediction is `gmm_model.classify.classify`, the function evaluation uses, with the version's rule unless the
request asks for another one whose statistics the version has. The encoder's tokens are rounded through float16
first: evaluation reads them from the feature cache, which stores float16, so the service classifies the same
numbers the evaluation measured. The `free` rule hands the generated text, with the version's class list, to the
Matcher deployment through a `TextMatcher` stand-in (`RemoteMatcher`).

Every replica tells the Watcher what it serves after each move (`report`: its replica id, the generation, version and
sha256 it serves, and the error if it could not load the one it was told), so `announce` settles only once every
replica serves the new version. A replica behind the Ingress's floor (the newest (generation, version) already
answered) says so ("stale") instead of answering, and the Ingress asks again.

Model code (torch, transformers) is imported inside the methods: this module is imported wherever the application
is built, and the Watcher (which loads no model) uses `read_version` from here.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from gmm_model.rules import Rule

from .settings import CaptionerConfig, default_cache_dir

if TYPE_CHECKING:
    from cil_platform.storage.store import Manifest, ProjectionStore
    from gmm_model.classify import ClassifierStats, Prediction

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class VersionFiles:
    manifest: "Manifest"
    rule: Rule
    weights: bytes
    class_stats: bytes | None


def newest_good_version(store: "ProjectionStore") -> int | None:
    """The newest version whose files all match their manifest (the store falls back past damaged ones)."""
    good = store.newest_good()
    return good[0].version if good is not None else None


def read_version(store: "ProjectionStore", version: int, stack_fingerprint: str) -> VersionFiles:
    """A version's files, checked without any model: against its manifest (size and sha256 of the weights and of
    the class statistics), against the served stack, and its rule (known, with a statistics file when it needs
    one; what the statistics hold is checked when the Captioner loads them). LookupError: no such committed
    version; ValueError: one that cannot be served."""
    from cil_platform.storage.store import CorruptEntryError

    try:
        manifest, weights = store.load(version)
        class_stats = store.class_stats(manifest)
    except FileNotFoundError as error:
        raise LookupError(str(error)) from None
    except CorruptEntryError as error:
        raise ValueError(str(error)) from None
    if manifest.stack_fingerprint != stack_fingerprint:
        raise ValueError(f"version {version} was trained for stack {manifest.stack_fingerprint}; "
                         f"this app serves stack {stack_fingerprint}")
    try:
        rule = Rule(manifest.rule)
    except ValueError:
        raise ValueError(f"version {version} records the unknown rule {manifest.rule!r}; known: "
                         f"{', '.join(r.value for r in Rule)}") from None
    if (rule.prior or rule.fused) and class_stats is None:
        raise ValueError(f"version {version} records the rule {rule.value!r} but no class statistics for it")
    return VersionFiles(manifest, rule, weights, class_stats)


@dataclass(frozen=True)
class ServedVersion:
    """One model version, immutable: its projection (inside `gmm`), classes, rule and statistics travel together."""

    version: int
    sha256: str  # of the projection's weights: a re-published version N is told apart by it
    generation: int  # the move (CaptionerConfig.generation) that made this replica serve it
    task: int
    classes: tuple[str, ...]
    stack_fingerprint: str
    created_at: str
    rule: Rule  # the rule its metrics were measured with: what a request gets by default
    stats: "ClassifierStats"  # the class statistics published with it (one row per class, in class order)
    rules: tuple[str, ...]  # every rule these statistics allow (always `free` and `trie`)
    metrics: dict[str, Any]
    gmm: Any  # gmm_model.GMM sharing the frozen LLM, with this version's projection


@dataclass(frozen=True)
class CaptionJob:
    image: np.ndarray
    top_k: int
    rule: str | None  # None: the version's rule
    describe: bool = False  # the model writes on after its answer (gmm_model.classify.describe)


class RemoteMatcher:
    """A `TextMatcher` stand-in whose similarities come from the Matcher deployment, so the free rule runs through
    `gmm_model.classify.classify` exactly as in evaluation. Called from the Captioner's compute thread (never its
    event loop), where blocking on a handle response is allowed."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def similarities(self, texts: list[str], class_names: list[str]):
        import torch

        return torch.from_numpy(self.handle.similarities.remote(list(texts), list(class_names)).result())


def allowed_rules(stats: "ClassifierStats", num_classes: int) -> tuple[str, ...]:
    allowed = []
    for rule in Rule:
        try:
            stats.check(rule, num_classes)
        except ValueError:
            continue
        allowed.append(rule.value)
    return tuple(allowed)


@serve.deployment(name="Captioner", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Captioner:
    def __init__(self, store_url: str, storage_options: dict, stack: dict, cache_dir: str | None,
                 matcher: DeploymentHandle, watcher: DeploymentHandle | None = None, threads: int = 1):
        import torch

        from cil_platform.storage.store import ProjectionStore
        from gmm_model import ModelStack, create_encoder, create_gmm

        torch.set_num_threads(threads)
        self.stack = ModelStack.model_validate(stack)
        self.store = ProjectionStore(store_url, storage_options)
        self.encoder = create_encoder(self.stack).eval()
        self.base = create_gmm(self.stack, self.encoder.width, cache_dir or default_cache_dir())
        self.matcher = RemoteMatcher(matcher)
        self.watcher = watcher
        self.replica = serve.get_replica_context().replica_tag
        self.reporting: asyncio.Task | None = None
        self.moving: tuple[int, asyncio.Event] | None = None  # the generation being loaded, set once it is done
        self.active: ServedVersion | None = None
        self.compute = threading.Lock()  # one model computation at a time: a batch, or building a version
        self.config = CaptionerConfig()

    # ---- versions ----------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        config = CaptionerConfig.model_validate(user_config or {})
        self._caption.set_max_batch_size(config.max_batch_size)
        self._caption.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config
        # off the event loop: requests keep being answered by the current version meanwhile
        self.moving = (config.generation, asyncio.Event())
        try:
            error = await asyncio.to_thread(self._activate, config)
        finally:
            self.moving[1].set()
        # in the background: a replica starting beside the Watcher must not wait for it to come up
        self.reporting = asyncio.get_running_loop().create_task(self._report(config.generation, error))

    async def _report(self, generation: int, error: str | None) -> None:
        """Tell the Watcher what this replica serves now (announce waits for every replica's report)."""
        if self.watcher is None:
            return
        served = self.active
        report = {"generation": generation, "error": error,
                  "serving": None if served is None else {"version": served.version, "sha256": served.sha256,
                                                          "generation": served.generation}}
        try:
            await self.watcher.report.remote(self.replica, report)
        except Exception:  # the Watcher restarting: it learns this replica's state on the next move
            logger.exception("could not report to the Watcher")

    def _activate(self, config: CaptionerConfig) -> str | None:
        """Serve the version `config` names (None: the store's newest good one); returns why not, or None."""
        version = config.version if config.version is not None else newest_good_version(self.store)
        if version is None:
            logger.warning("projection store %s has no good version yet; /v1/classify answers 503 until one "
                           "is published", self.store.url)
            return None
        active = self.active
        if active is not None and active.version == version and config.sha256 in (None, active.sha256):
            if active.generation != config.generation:
                self.active = replace(active, generation=config.generation)  # the same weights, a newer move
            return None
        try:
            served = self._load(version, config.sha256, config.generation)
        except Exception as error:
            if self.active is None:
                raise  # a replica without any model must not come up
            logger.exception("could not load version %s; still serving version %s", version, self.active.version)
            return f"{type(error).__name__}: {error}"
        self.active = served  # the swap: one reference assignment
        logger.info("serving version %s (sha256 %s, generation %s, task %s, %s classes, rule %s)", served.version,
                    served.sha256[:12], served.generation, served.task, len(served.classes), served.rule.value)
        return None

    def _load(self, version: int, sha256: str | None = None, generation: int = 0) -> ServedVersion:
        from gmm_model import GMM, Projection
        from gmm_model.classify import ClassifierStats

        files = read_version(self.store, version, self.stack.fingerprint)
        manifest, rule = files.manifest, files.rule
        if sha256 is not None and manifest.sha256 != sha256:
            raise ValueError(f"version {version} in the store has weights {manifest.sha256[:12]}, not the announced "
                             f"{sha256[:12]} (re-published since): announce it again")
        stats = ClassifierStats.from_bytes(files.class_stats) if files.class_stats is not None else ClassifierStats()
        stats.check(rule, len(manifest.seen_classes))  # a version must at least answer with its own rule
        base = self.base
        projection = Projection(base.projection.in_features, base.projection.out_features).load_bytes(files.weights)
        with self.compute:
            gmm = GMM(base.llm, base.tokenizer, projection, self.stack.prompt).eval()
            gmm.prefix_cache(1)  # compute the shared prompt prefix now, not in the first request
        return ServedVersion(manifest.version, manifest.sha256, generation, manifest.task, tuple(manifest.seen_classes),
                             manifest.stack_fingerprint, manifest.created_at, rule, stats,
                             allowed_rules(stats, len(manifest.seen_classes)), dict(manifest.metrics), gmm)

    def _stale(self, floor: "tuple[int, int] | None") -> dict | None:
        """{"error": "stale"} when this replica serves an older version than the Ingress has answered with."""
        served = self.active
        if served is not None and floor is not None and (served.generation, served.version) < tuple(floor):
            return {"error": "stale", "generation": served.generation, "version": served.version}
        return None

    async def _behind(self, floor: "tuple[int, int] | None") -> dict | None:
        """As `_stale`, but a replica that is loading the floor's generation right now answers once it has it
        (instead of sending the request back to the Ingress to be retried)."""
        stale = self._stale(floor)
        if stale is not None and self.moving is not None and self.moving[0] >= floor[0]:
            await self.moving[1].wait()
            stale = self._stale(floor)
        return stale

    async def info(self, floor: "tuple[int, int] | None" = None) -> dict:
        served = self.active
        if served is None:
            return {"error": "no_model"}
        stale = await self._behind(floor)
        served = self.active
        if stale is not None:
            return stale
        return {"version": served.version, "sha256": served.sha256, "generation": served.generation,
                "replica": self.replica, "task": served.task, "seen_classes": list(served.classes),
                "num_classes": len(served.classes), "stack_fingerprint": served.stack_fingerprint,
                "created_at": served.created_at, "rule": served.rule.value, "rules": list(served.rules),
                "metrics": served.metrics}

    # ---- prediction --------------------------------------------------------------------------
    async def caption(self, image: np.ndarray, top_k: int, rule: str | None = None, describe: bool = False,
                      floor: "tuple[int, int] | None" = None) -> dict:
        """One image's prediction (with a description if asked); or
        {"error": "no_model" | "stale" | "unknown_rule" | "rule_unavailable", "detail": ...}."""
        if self.active is None:
            return {"error": "no_model"}
        stale = await self._behind(floor)
        if stale is not None:
            return stale
        if rule is not None:
            try:
                rule = Rule(rule).value
            except ValueError:
                return {"error": "unknown_rule",
                        "detail": f"unknown rule {rule!r}; use one of {', '.join(r.value for r in Rule)}"}
        return await self._caption(CaptionJob(image, top_k, rule, describe))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _caption(self, jobs: list[CaptionJob]) -> list[dict]:
        served = self.active  # read once: this batch is answered by exactly this version
        if served is None:
            return [{"error": "no_model"}] * len(jobs)
        return await asyncio.to_thread(self._run, served, jobs)

    def _run(self, served: ServedVersion, jobs: list[CaptionJob]) -> list[dict]:
        from gmm_model.classify import classify, describe

        classes = list(served.classes)
        out: list[dict | None] = [None] * len(jobs)
        rules = [Rule(job.rule) if job.rule is not None else served.rule for job in jobs]
        for i, rule in enumerate(rules):
            if rule.value not in served.rules:  # checked against the version that answers, not the one asked
                out[i] = {"error": "rule_unavailable",
                          "detail": f"version {served.version} has no class statistics for rule {rule.value!r} "
                                    f"(it was measured with {served.rule.value!r}); it answers with "
                                    f"{', '.join(served.rules)}"}
        todo = [i for i, result in enumerate(out) if result is None]
        if todo:
            with self.compute:
                # float16, as the feature cache evaluation reads from: the same numbers the metrics were measured on
                visual = self.encoder.encode([jobs[i].image for i in todo]).half().float()
                for rule in dict.fromkeys(rules[i] for i in todo):
                    rows = [n for n, i in enumerate(todo) if rules[i] is rule]
                    k = max(jobs[todo[n]].top_k for n in rows)
                    predictions = classify(served.gmm, visual[rows], classes, rule, served.stats,
                                           self.matcher if rule is Rule.FREE else None, top_k=k)
                    described = [j for j, n in enumerate(rows) if jobs[todo[n]].describe]
                    if described:
                        with_text = describe(served.gmm, visual[[rows[j] for j in described]],
                                             [predictions[j] for j in described], rule, self.config.description_tokens)
                        for j, prediction in zip(described, with_text):
                            predictions[j] = prediction
                    for n, p in zip(rows, predictions):
                        out[todo[n]] = answer(p, jobs[todo[n]].top_k, rule, served, self.replica)
        return out


def answer(prediction: "Prediction", top_k: int, rule: Rule, served: ServedVersion, replica: str) -> dict:
    """A prediction as the API returns it, naming the version (number, weights' sha256, generation), the rule and
    the replica that produced it."""
    body = {"label": prediction.label, "score": prediction.score, "text": prediction.text,
            "top_k": [{"label": label, "score": score} for label, score in prediction.top_k[:top_k]],
            "rule": rule.value, "version": served.version, "sha256": served.sha256, "generation": served.generation,
            "task": served.task, "replica": replica}
    if prediction.description is not None:
        body.update(description=prediction.description.text, description_complete=prediction.description.ended)
    return body
