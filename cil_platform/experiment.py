"""One class-incremental experiment, top to bottom (the data flow of shared/DESIGN.md).

classes -> stage-1 aligned projection (disjoint classes) -> scenario -> cached frozen features ->
for each task: Ray Train fit of the projection (with replay) -> publish to the projection store ->
evaluate on all seen classes -> update the replay memory and the baselines -> report.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray

from gmm_model import create_encoder
from gmm_model.llm import prepare_llm
from gmm_model.vision import VisionEncoder

from .alignment import AlignedProjection, alignment_classes, default_aligned_path, read_aligned, write_aligned
from .baselines import NearestClassMean, make_baseline
from .config import CREDENTIAL_FIELDS, REPO_ROOT, ExperimentConfig
from .datasets import dataset_class_names, load_dataset
from .evaluation import ClassMeans, EvaluatorPool
from .features import FeatureCache, FeatureTable, extract_features
from .metrics import CLMetrics, evaluate_task
from .replay import make_memory
from .report import format_table, write_report
from .run_state import open_run_state, train_storage
from .scenario import build_scenario
from .store import ProjectionStore
from .training import train_task

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> None:
    """Connect to `address` / $RAY_ADDRESS (e.g. under `ray job submit`), or start Ray locally."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local",  # a new local instance, never a stray `ray start` cluster on this machine
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}},
                 include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def features_for(cfg: ExperimentConfig, encoder: VisionEncoder, classes: list[str],
                 **dataset_overrides) -> tuple[FeatureTable, FeatureTable]:
    """Cached frozen features of the train and test split of `classes` (computed where missing)."""
    splits = load_dataset(cfg.dataset.model_copy(update=dataset_overrides), classes=classes)
    cache = FeatureCache(cfg.features_url, encoder.identity, cfg.storage.options)
    train, test = extract_features([splits.train, splits.test], cfg.stack, cache, actors=cfg.eval.actors)
    return train, test


def resolve_alignment(cfg: ExperimentConfig, class_names: list[str], encoder: VisionEncoder) -> AlignedProjection | None:
    """The configured, shipped or cached aligned projection; built (one Ray Train fit) when absent."""
    if not cfg.alignment.enabled:
        return None
    if cfg.alignment.projection:
        return read_aligned(cfg.alignment.projection)
    shipped, cached = default_aligned_path(cfg.stack, cfg.cache_dir)
    for path in (shipped, cached):
        if path.is_file():
            return read_aligned(str(path))
    log.warning("no aligned projection for stack %s; building it (stage 1)", cfg.stack.fingerprint)
    aligned = build_alignment(cfg, class_names, encoder)
    write_aligned(str(cached), aligned.weights, aligned.classes, cfg.stack, "built on first use")
    return read_aligned(str(cached))


def build_alignment(cfg: ExperimentConfig, class_names: list[str], encoder: VisionEncoder) -> AlignedProjection:
    align = cfg.alignment
    classes = alignment_classes(class_names, align.num_classes, align.class_seed,
                                reserved=set(cfg.scenario.class_order or []))
    train, _ = features_for(cfg, encoder, classes, train_per_class=align.train_per_class, test_per_class=1)
    train_cfg = cfg.train.model_copy(update={"epochs": align.epochs, "lr": align.lr})
    result = train_task(-1, train, None, None, cfg.stack, encoder.width, cfg.cache_dir, train_cfg, 0.0,
                        train_storage(cfg), cfg.seed, storage_options=cfg.storage.options)
    return AlignedProjection(result.projection, classes, "stage-1")


def run_experiment(cfg: ExperimentConfig, fresh: bool = False) -> dict:
    """Runs, or resumes after its last completed task, the experiment in cfg.output_dir (see run_state);
    `fresh` discards an earlier run's progress there."""
    started = time.perf_counter()
    init_ray(cfg.ray_address)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = open_run_state(cfg, fresh)
    encoder = create_encoder(cfg.stack)  # the driver's copy: its width and identity (the actor pool encodes)
    visual_width = encoder.width
    all_classes = dataset_class_names(cfg.dataset)
    aligned = resolve_alignment(cfg, all_classes, encoder)
    held_out = set(aligned.classes) if aligned else set()
    if cfg.scenario.class_order and held_out & set(cfg.scenario.class_order):
        raise ValueError(f"scenario classes overlap the alignment classes: {sorted(held_out & set(cfg.scenario.class_order))}")
    scenario = build_scenario(cfg.scenario, [c for c in all_classes if c not in held_out], cfg.seed)
    train, test = features_for(cfg, encoder, scenario.class_order)
    print(f"{scenario.name}: {len(scenario)} tasks, {len(train)} train / {len(test)} test images, "
          f"skipped {dict(train.skipped + test.skipped) or 0}; features ready at {time.perf_counter() - started:.0f}s",
          flush=True)

    store = ProjectionStore(cfg.store_url, cfg.storage.options)
    memory = make_memory(cfg.replay.mode, cfg.replay.budget, cfg.replay.selection, cfg.seed)
    baselines = [make_baseline(name, cfg.seed) for name in cfg.baselines]
    trie = cfg.eval.decode == "trie"
    prototypes = NearestClassMean() if cfg.eval.fuse_prototypes and trie else None
    class_means = ClassMeans() if cfg.eval.prior_correction and trie else None
    rule = "trie+prior" if class_means else cfg.eval.decode
    gmm_name, fused_name = f"gmm[{cfg.replay.mode},{rule}]", f"gmm[{cfg.replay.mode},{rule}+ncm]"
    gmm_rules = {gmm_name: rule, **({fused_name: f"{rule}+ncm"} if prototypes else {})}
    rows = {name: {"task_acc": [], "overall": [], "seconds": 0.0} for name in [*gmm_rules, *cfg.baselines]}
    prepare_llm(cfg.stack.llm, cfg.cache_dir)  # once, here: else every trainer and evaluator de-quantises a GGUF
    evaluators = EvaluatorPool(cfg.eval.actors, cfg.stack, visual_width, cfg.cache_dir, cfg.eval.decode,
                               cfg.eval.batch_size)
    projection = aligned.weights if aligned else None
    storage = train_storage(cfg)
    tasks = []
    throughput = dict.fromkeys(["train_images", "train_seconds", "eval_images", "eval_seconds"], 0.0)
    components = {"memory": memory, **({"prototypes": prototypes} if prototypes else {}),
                  **({"class_means": class_means} if class_means else {}),
                  **{baseline.name: baseline for baseline in baselines}}  # what run_state persists after each task
    resumed = run.load(store, components)
    if resumed:
        projection, rows, throughput = resumed.projection, resumed.rows, resumed.throughput
        print(f"resuming {cfg.output_dir}: {resumed.next_task} of {len(scenario)} tasks were completed", flush=True)
    try:
        for task in scenario:
            tasks.append(task)
            if resumed and task.index < resumed.next_task:
                continue
            seen = list(task.seen_classes)
            task_train = train.subset(scenario.training_mask(task, train.labels, train.keys))  # few-shot: K per class
            seen_test = test.select(seen)
            if len(task_train) == 0:
                raise ValueError(f"task {task.index} has no training images for classes {list(task.new_classes)}")
            t0 = time.perf_counter()
            trained = train_task(task.index, task_train, projection, memory.payload(), cfg.stack, visual_width,
                                 cfg.cache_dir, cfg.train, cfg.replay.ratio if cfg.replay.mode != "none" else 0.0,
                                 storage, cfg.seed, storage_options=cfg.storage.options)
            projection = trained.projection
            manifest = store.publish(task.index, projection, seen, cfg.stack.fingerprint,
                                     extra={"experiment": cfg.name, "replay": cfg.replay.mode})
            if cfg.announce_url:
                announce_to_service(cfg.announce_url, manifest.version)
            t1 = time.perf_counter()
            for statistics in filter(None, (prototypes, class_means)):
                statistics.learn(task_train, seen)
            predicted = evaluators.predict(projection, seen_test, seen, prototypes.matrix(seen) if prototypes else None,
                                           class_means.matrix(seen) if class_means else None)
            t2 = time.perf_counter()
            accuracy = {}
            for name, rule in gmm_rules.items():
                acc_row, accuracy[name] = evaluate_task(predicted[rule], list(seen_test.labels), tasks)
                _record(rows[name], acc_row, accuracy[name], time.perf_counter() - t0)
            overall = accuracy[gmm_name]
            store.annotate(task.index, {"accuracy": overall, "task_accuracy": rows[gmm_name]["task_acc"][-1]})
            memory.update(task_train)
            throughput["train_images"] += trained.images
            throughput["train_seconds"] += trained.seconds
            throughput["eval_images"] += len(seen_test)
            throughput["eval_seconds"] += t2 - t1
            line = [f"task {task.index + 1}/{len(scenario)}: gmm {overall:.1%}"
                    + (f" (+ncm {accuracy[fused_name]:.1%})" if prototypes else "")
                    + f" (train {t1 - t0:.0f}s, loss {trained.loss:.3f}, eval {t2 - t1:.0f}s)"]
            for baseline in baselines:
                b0 = time.perf_counter()
                baseline.learn(task_train, seen)
                b_row, b_overall = evaluate_task(baseline.predict(seen_test, seen), list(seen_test.labels), tasks)
                _record(rows[baseline.name], b_row, b_overall, time.perf_counter() - b0)
                line.append(f"{baseline.name} {b_overall:.1%}")
            run.save(task.index, manifest, components, rows, throughput)
            print(" | ".join(line), f"[{time.perf_counter() - started:.0f}s]", flush=True)
    finally:
        evaluators.close()

    rows[gmm_name]["memory_bytes"] = memory.nbytes + (class_means.memory_bytes if class_means else 0)
    if prototypes:
        rows[fused_name]["memory_bytes"] = rows[gmm_name]["memory_bytes"] + prototypes.memory_bytes
    rows[gmm_name]["train_images_per_second"] = throughput["train_images"] / max(throughput["train_seconds"], 1e-9)
    rows[gmm_name]["eval_images_per_second"] = throughput["eval_images"] / max(throughput["eval_seconds"], 1e-9)
    for baseline in baselines:
        rows[baseline.name]["memory_bytes"] = baseline.memory_bytes
    for row in rows.values():
        row["metrics"] = CLMetrics.from_matrix(row["task_acc"], row["overall"]).summary()
    results = {
        "title": f"{cfg.name}: {scenario.name} on {len(scenario.class_order)} classes",
        "config": cfg.model_dump(mode="json", exclude=CREDENTIAL_FIELDS),
        "scenario": {"name": scenario.name, "class_order": scenario.class_order},
        "alignment": {"origin": aligned.origin, "classes": len(aligned.classes)} if aligned else None,
        "skipped_images": dict(train.skipped + test.skipped),
        "methods": rows,
        "seconds": time.perf_counter() - started,
    }
    paths = write_report(str(out), results)
    if cfg.storage.url:  # and beside the store: the driver's disk may not outlive a cluster
        paths.update({f"{k} (copy)": v for k, v in write_report(cfg.run_url, results, cfg.storage.options).items()})
    print(format_table(results))
    print(f"wrote {', '.join(paths.values())} in {results['seconds']:.0f}s")
    return results


def announce_to_service(url: str, version: int) -> None:
    """Tell a running service of a new version; a serving problem never fails the experiment."""
    from serve.client import AnnounceError, announce

    try:
        announce(url, version, token=os.environ.get("GMM_CIL_SERVE_TOKEN"), wait=False)
    except AnnounceError as error:
        log.warning("could not announce version %d to %s: %s", version, url, error)


def _record(row: dict, acc_row: list[float], overall: float, seconds: float) -> None:
    row["task_acc"].append(acc_row)
    row["overall"].append(overall)
    row["seconds"] += seconds
