"""One class-incremental experiment, top to bottom (the data flow of shared/DESIGN.md): set up, then one step per
task, then the summary.

set_up:   Ray, run state, the stage-1 aligned projection, the scenario (classes disjoint from alignment's),
          cached frozen features (streamed sets: the driver holds labels, keys and cache places, never features),
          the class statistics, replay memory and baselines; the training session starts with the first task to run.
run_task: (diagnostic: the starting projection's zero-shot accuracy on the new classes) -> the Ray Train fit of the
          projection (with replay) -> the class statistics of the new classes (and the ridge fusion's ridge) ->
          evaluation on all seen classes under every rule -> ONE publication to the projection store (projection,
          the statistics its rule needs, its metrics) -> the baselines -> the run state (resumable after this task).
summary:  metrics of every method, results.json, the plot and the table.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from gmm_model import create_encoder
from gmm_model.rules import Rule

from .alignment import AlignedProjection, resolve_alignment
from .baselines import make_baseline
from .class_stats import ClassStatistics, Part
from .config import CREDENTIAL_FIELDS, ExperimentConfig
from .data import dataset_class_names
from .evaluation import evaluate
from .features import FeatureSet, feature_sets_for
from .fusion import RidgeFusion
from .metrics import CLMetrics, evaluate_task
from .paths import REPO_ROOT
from .progress import Console
from .replay import make_memory
from .report import format_table, write_report
from .scenario import ClassIncremental, Task, build_scenario
from .storage.run_state import RunState, open_run_state
from .storage.store import Manifest, ProjectionStore
from .tracking import Tracker, start_tracking
from .training.session import FitResult, SessionSpec, TrainingSession

log = logging.getLogger(__name__)

OnPublish = Callable[[Manifest], None]  # told of every version as soon as it is in the store (e.g. a serving app)


# for every process of a local Ray: no download/loading bars from the Hugging Face libraries in the log
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Ray keeps idle worker processes up to a soft limit, by default the node's CPU count. On a small node whose CPUs
# the training session holds, every feature read then started a fresh worker process (2.6-2.9 s a read on this
# 2-core machine, 0.1 s with idle workers kept; docs/data_plane.md). A `ray start` cluster sets it through the
# environment variable RAY_num_workers_soft_limit.
IDLE_WORKERS_KEPT = 16


def init_ray(address: str | None) -> None:
    """Connect to `address` / $RAY_ADDRESS (e.g. under `ray job submit`), or start Ray locally.

    A local Ray runs its dashboard (on 127.0.0.1): it serves the State API, which Ray Train's placement-group
    cleaner polls every few seconds to see whether a fit's controller is alive (warning on every poll without it)."""
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local",  # a new local instance, never a stray `ray start` cluster on this machine
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **WORKER_ENV}},
                 include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                 _system_config={"num_workers_soft_limit": IDLE_WORKERS_KEPT})
    ray.data.DataContext.get_current().enable_progress_bars = False


@dataclass
class MethodRecord:
    """One method's results so far: accuracy on each task's classes and on all seen classes, after each task."""

    task_acc: list[list[float]] = field(default_factory=list)
    overall: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, task_acc: list[float], overall: float, seconds: float) -> None:
        self.task_acc.append(task_acc)
        self.overall.append(overall)
        self.seconds += seconds


@dataclass
class ZeroShot:
    """The diagnostic accuracy, per task, of the starting projection on the task's classes before it trains on them
    (None for a task that starts from no projection)."""

    accuracy: list[float | None] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"accuracy": list(self.accuracy)}

    def load_state_dict(self, state: dict) -> None:
        self.accuracy = [None if a is None else float(a) for a in state["accuracy"]]


@dataclass
class Throughput:
    train_images: float = 0.0
    train_seconds: float = 0.0  # on the driver, from posting each update to holding its weights
    steps_seconds: float = 0.0  # of that, the workers' optimizer steps (the rest: start-up, checkpoints, transfers)
    eval_images: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class Progress:
    """What changes from task to task (and what the run state persists besides the components)."""

    projection: bytes | None
    records: dict[str, MethodRecord]
    throughput: Throughput = field(default_factory=Throughput)
    tasks: list[Task] = field(default_factory=list)  # the tasks seen so far, completed or resumed


@dataclass
class Setup:
    """Everything fixed for the whole experiment."""

    cfg: ExperimentConfig
    scenario: ClassIncremental
    aligned: AlignedProjection | None
    visual_width: int
    train: FeatureSet
    test: FeatureSet
    store: ProjectionStore
    run: RunState
    stats: ClassStatistics
    memory: object  # a replay memory (replay.py)
    baselines: list
    fusion: RidgeFusion | None  # the trie+prior+ridge rule's ridge and weights (learned before each evaluation)
    zero_shot: ZeroShot | None
    session_spec: SessionSpec  # the experiment's one worker group: trains every task and evaluates it
    on_publish: OnPublish | None
    console: Console  # what the run tells its user (progress.py)
    started_session: TrainingSession | None = None

    @property
    def session(self) -> TrainingSession:
        """Started on first use: a resumed run with no task left never pays for the worker group (about 27 s)."""
        if self.started_session is None:
            self.console.phase("workers")  # one word: a task's progress bar shows it as a phase
            self.started_session = TrainingSession(self.session_spec)
        return self.started_session

    def close_session(self) -> None:
        if self.started_session is not None:
            self.started_session.close()

    @property
    def rules(self) -> list[Rule]:
        return self.cfg.eval.rules

    def method_name(self, rule: Rule) -> str:
        return f"gmm[{self.cfg.replay.mode},{rule.value}]"

    @property
    def components(self) -> dict:
        """What the run state persists after each task (numpy arrays and JSON values)."""
        return {"memory": self.memory, "class_stats": self.stats,
                **({"ridge_fusion": self.fusion} if self.fusion else {}),
                **({"zero_shot": self.zero_shot} if self.zero_shot else {}),
                **{baseline.name: baseline for baseline in self.baselines}}

    def stats_parts(self, rule: Rule) -> set[Part]:
        """The class statistics GMM uses with `rule`: the replay's, the prior's means, the fusion's prototypes."""
        return {*self.memory.stats_parts, *(["mean"] if rule.prior else []), *(["prototype"] if rule.prototypes else [])}


def set_up(cfg: ExperimentConfig, fresh: bool, on_publish: OnPublish | None, started: float,
           console: Console) -> Setup:
    console.phase("starting Ray")
    init_ray(cfg.ray_address)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    run = open_run_state(cfg.run_url, cfg.storage.options, cfg.config_hash, fresh)
    console.phase("vision encoder, alignment")
    encoder = create_encoder(cfg.stack)  # the driver's copy: its width and identity (the actor pool encodes)
    all_classes = dataset_class_names(cfg.dataset)
    aligned = resolve_alignment(cfg, all_classes, encoder.width, encoder.identity)
    held_out = set(aligned.classes) if aligned else set()
    if cfg.scenario.class_order and held_out & set(cfg.scenario.class_order):
        raise ValueError(f"scenario classes overlap the alignment classes: {sorted(held_out & set(cfg.scenario.class_order))}")
    scenario = build_scenario(cfg.scenario, [c for c in all_classes if c not in held_out], cfg.seed)
    console.phase("features")
    train, test = feature_sets_for(cfg, encoder.identity, scenario.class_order)
    console.say(f"{scenario.name}: {len(scenario)} tasks, {len(train)} train / {len(test)} test images, "
                  f"skipped {dict(train.skipped + test.skipped) or 0}; features ready at "
                  f"{time.perf_counter() - started:.0f}s")
    stats = ClassStatistics()
    fusion = RidgeFusion(seed=cfg.seed) if any(rule.ridge for rule in cfg.eval.rules) else None
    return Setup(
        cfg=cfg, scenario=scenario, aligned=aligned, visual_width=encoder.width, train=train, test=test,
        store=ProjectionStore(cfg.store_url, cfg.storage.options), run=run, stats=stats,
        memory=make_memory(cfg.replay.mode, stats, cfg.replay.budget, cfg.replay.selection, cfg.seed,
                           cfg.replay.covariance),
        baselines=[make_baseline(name, stats, cfg.seed, pool=train, ridge=fusion.ridge if fusion else None)
                   for name in cfg.baselines],
        fusion=fusion, zero_shot=ZeroShot() if cfg.eval.zero_shot else None,
        session_spec=SessionSpec(  # the session de-quantises the LLM once when it starts (TrainingSession)
            name="experiment", stack=cfg.stack, visual_width=encoder.width, cache_dir=cfg.cache_dir, train=cfg.train,
            storage_url=cfg.train_storage_url, storage_options=cfg.storage.options,
            max_failures=cfg.train.max_failures),
        on_publish=on_publish, console=console)


def start_or_resume(setup: Setup) -> tuple[Progress, int]:
    """The progress to continue from and the index of the first task still to run."""
    names = [setup.method_name(rule) for rule in setup.rules] + list(setup.cfg.baselines)
    progress = Progress(setup.aligned.weights if setup.aligned else None, {name: MethodRecord() for name in names})
    resumed = setup.run.load(setup.store, setup.components)
    if not resumed:
        return progress, 0
    progress.projection = resumed.projection
    progress.records = {name: MethodRecord(**record) for name, record in resumed.rows.items()}
    progress.throughput = Throughput(**resumed.throughput)
    setup.console.say(f"resuming {setup.cfg.output_dir}: {resumed.next_task} of {len(setup.scenario)} tasks were completed")
    return progress, resumed.next_task


def fit_task(setup: Setup, task: Task, rows: FeatureSet, start: bytes | None) -> FitResult:
    cfg = setup.cfg
    replay = setup.memory.payload()
    if replay is not None and cfg.replay.align_weight > 0:  # classifier alignment toward the fusion's ridge head
        replay["align"] = {"weight": cfg.replay.align_weight, "scale": setup.fusion.scale,
                           "head": setup.fusion.head(replay["classes"]).numpy()}
    return setup.session.fit(f"task-{task.index:03d}", rows, start,
                             seed=cfg.seed + 1000 * (task.index + 1), replay=replay,
                             replay_ratio=cfg.replay.ratio if cfg.replay.mode != "none" else 0.0)


def zero_shot_accuracy(setup: Setup, task: Task, start: bytes | None) -> float | None:
    """The starting projection's plain-trie accuracy on the task's test images among the task's own classes."""
    if start is None:
        return None
    new = list(task.new_classes)
    test = setup.test.select(new)
    labels = evaluate(setup.session, start, test, new, [Rule.TRIE], setup.cfg.eval.batch_size).labels[Rule.TRIE]
    return float(np.mean([p == str(y) for p, y in zip(labels, test.labels)]))


def run_task(setup: Setup, progress: Progress, task: Task, tracker: Tracker) -> str:
    """Train, evaluate, publish and checkpoint one task; returns its line for the terminal."""
    cfg, tasks = setup.cfg, progress.tasks
    seen = list(task.seen_classes)
    task_train = setup.train.subset(setup.scenario.training_mask(task, setup.train.labels, setup.train.keys))
    seen_test = setup.test.select(seen)
    if len(task_train) == 0:
        raise ValueError(f"task {task.index} has no training images for classes {list(task.new_classes)}")
    zero_shot = ""
    if setup.zero_shot is not None:
        setup.console.phase("zero-shot")
        setup.zero_shot.accuracy.append(zero_shot_accuracy(setup, task, progress.projection))
        if setup.zero_shot.accuracy[-1] is not None:
            zero_shot = f"zero-shot {setup.zero_shot.accuracy[-1]:.1%}, "
    t0 = time.perf_counter()
    setup.console.phase("train")
    # with the ridge fusion, the projection leaves the fusion's validation rows out (everything else learns them all)
    trainable = task_train if setup.fusion is None else task_train.subset(~setup.fusion.held_out(task_train))
    trained = fit_task(setup, task, trainable, progress.projection)
    t1 = time.perf_counter()
    setup.console.phase("evaluate")
    validation = None
    if setup.fusion is not None:  # before the class statistics learn the task (pseudo-features of old classes only)
        validation = setup.fusion.learn_and_validate(task_train, setup.stats, seen, cfg.seed + task.index,
                                                     cfg.eval.fusion_pseudo_per_class)
    setup.stats.learn(task_train)
    rules = setup.rules
    evaluation = evaluate(
        setup.session, trained.projection, seen_test, seen, rules, cfg.eval.batch_size,
        class_means=setup.stats.matrix("mean", seen) if any(r.prior for r in rules) else None,
        prototypes=setup.stats.matrix("prototype", seen) if any(r.prototypes for r in rules) else None,
        ridge_head=setup.fusion.head(seen) if validation is not None else None, validation=validation)
    if setup.fusion is not None:
        setup.fusion.chosen.append(tuple(evaluation.stats.fusion.tolist()))
    t2 = time.perf_counter()
    accuracy = {}
    for rule in rules:
        task_acc, accuracy[rule] = evaluate_task(evaluation.labels[rule], list(seen_test.labels), tasks)
        progress.records[setup.method_name(rule)].add(task_acc, accuracy[rule], t2 - t0)
    served = cfg.eval.served_rule
    setup.console.phase("publish")
    published = evaluation.stats.for_rule(served)
    manifest = setup.store.publish(
        task.index, trained.projection, seen, cfg.stack.fingerprint, rule=served.value,
        class_stats=published.to_bytes() if served.prior or served.fused else None,
        metrics={"accuracy": accuracy[served], "task_accuracy": progress.records[setup.method_name(served)].task_acc[-1],
                 "accuracy_by_rule": {rule.value: value for rule, value in accuracy.items()}},
        extra={"experiment": cfg.name, "replay": cfg.replay.mode})
    if setup.on_publish:
        setup.on_publish(manifest)
    progress.projection = trained.projection
    setup.memory.update(task_train)
    throughput = progress.throughput
    throughput.train_images += trained.images
    throughput.train_seconds += trained.seconds
    throughput.steps_seconds += trained.metrics.get("steps_seconds", 0.0)
    throughput.eval_images += len(seen_test)
    throughput.eval_seconds += t2 - t1
    base, *fused = rules
    resumed = trained.metrics.get("start_epoch", 0)  # > 0: a worker group or driver restarted mid-update
    line = [f"task {task.index + 1}/{len(setup.scenario)}: {zero_shot}gmm {accuracy[base]:.1%}"
            + "".join(f" (+{rule.value.rsplit('+', 1)[-1]} {accuracy[rule]:.1%})" for rule in fused)
            + f" (train {t1 - t0:.0f}s of which steps {trained.metrics.get('steps_seconds', 0):.0f}s, "
              f"loss {trained.loss:.3f}, eval {t2 - t1:.0f}s"
            + (f", resumed from a checkpoint at epoch {resumed + 1}" if resumed else "") + ")"]
    setup.console.phase("baselines")
    for baseline in setup.baselines:
        b0 = time.perf_counter()
        baseline.learn(task_train, seen)
        task_acc, overall = evaluate_task(baseline.predict(seen_test, seen), list(seen_test.labels), tasks)
        progress.records[baseline.name].add(task_acc, overall, time.perf_counter() - b0)
        line.append(f"{baseline.name} {overall:.1%}")
    tracker.log_task(task.index, {"loss": trained.loss, "train_seconds": t1 - t0, "eval_seconds": t2 - t1,
                                 **{f"accuracy/{name}": r.overall[-1] for name, r in progress.records.items()}})
    setup.console.phase("checkpoint")
    setup.run.save(task.index, manifest, setup.components, {n: asdict(r) for n, r in progress.records.items()},
                   asdict(throughput))
    return " | ".join(line)


def summarise(setup: Setup, progress: Progress, seconds: float) -> dict:
    """results.json: every method's accuracy matrix, metrics and memory, with the config that produced them."""
    cfg, throughput = setup.cfg, progress.throughput
    methods = {name: asdict(record) for name, record in progress.records.items()}
    for rule in setup.rules:
        row = methods[setup.method_name(rule)]
        row["memory_bytes"] = (setup.memory.nbytes + setup.stats.nbytes(setup.stats_parts(rule))
                               + (setup.fusion.memory_bytes if rule.ridge else 0))
        if rule.ridge:
            row["chosen"] = [list(c) for c in setup.fusion.chosen]  # (a, b) of every task
        row["train_images_per_second"] = throughput.train_images / max(throughput.train_seconds, 1e-9)
        row["train_overhead_fraction"] = 1 - throughput.steps_seconds / max(throughput.train_seconds, 1e-9)
        row["eval_images_per_second"] = throughput.eval_images / max(throughput.eval_seconds, 1e-9)
    for baseline in setup.baselines:
        methods[baseline.name]["memory_bytes"] = baseline.memory_bytes
    for row in methods.values():
        row["metrics"] = CLMetrics.from_matrix(row["task_acc"], row["overall"]).summary()
    return {
        "title": f"{cfg.name}: {setup.scenario.name} on {len(setup.scenario.class_order)} classes",
        "config": cfg.model_dump(mode="json", exclude=CREDENTIAL_FIELDS),
        "scenario": {"name": setup.scenario.name, "class_order": setup.scenario.class_order},
        "alignment": {"origin": setup.aligned.origin, "classes": len(setup.aligned.classes)} if setup.aligned else None,
        "served_rule": cfg.eval.served_rule.value,
        "zero_shot": setup.zero_shot.accuracy if setup.zero_shot else None,
        "skipped_images": dict(setup.train.skipped + setup.test.skipped),
        "methods": methods,
        "seconds": seconds,
    }


def run_experiment(cfg: ExperimentConfig, fresh: bool = False, on_publish: OnPublish | None = None,
                   console: Console | None = None) -> dict:
    """Runs, or resumes after its last completed task, the experiment in cfg.output_dir (see storage/run_state.py);
    `fresh` discards an earlier run's progress there. `on_publish` is told of every new store version; `console`
    is what the run reports to (default: plain lines on stdout; the command line's draws progress bars)."""
    started = time.perf_counter()
    setup = set_up(cfg, fresh, on_publish, started, console or Console())
    try:
        return run_and_report(setup, started)
    finally:
        setup.run.release()  # the run's lease: another driver may take the run from here on


def run_and_report(setup: Setup, started: float) -> dict:
    """Every task still to run, then results.json, the plot and the MLflow run's end."""
    cfg = setup.cfg
    progress, next_task = start_or_resume(setup)
    setup.console.tasks(len(setup.scenario), next_task)
    tracker = start_tracking(cfg, resume=next_task > 0)  # MLflow (cil_platform/tracking.py)
    try:
        for task in setup.scenario:
            progress.tasks.append(task)
            if task.index >= next_task:
                line = run_task(setup, progress, task, tracker)
                setup.console.task_done(f"{line} [{time.perf_counter() - started:.0f}s]")
    except BaseException as error:
        tracker.fail(error)
        raise
    finally:
        setup.close_session()
    results = summarise(setup, progress, time.perf_counter() - started)
    paths = write_report(cfg.output_dir, results)
    if cfg.storage.url:  # and beside the store: the driver's disk may not outlive a cluster
        paths.update({f"{k} (copy)": v for k, v in write_report(cfg.run_url, results, cfg.storage.options).items()})
    latest = setup.store.latest()
    tracker.finish([paths["results"], paths["plot"]], latest.model_dump(mode="json") if latest else None)
    setup.console.say(format_table(results))
    setup.console.say(f"wrote {', '.join(paths.values())} in {results['seconds']:.0f}s")
    return results
