"""The arena: every baseline on GMM's frozen features, split and class order, without training GMM.

    python jobs/arena.py                                          # the demo scenario, every baseline
    python jobs/arena.py --set seed=1 --set scenario.order_seed=1 --baselines ncm ridge lda --out runs/arena-1

The scenario and features are set up as cil_platform/experiment.py's set_up does (the alignment classes held out,
the cached features; Ray only to fill the cache). Each baseline learns task by task as run_task calls it and is
scored with the same metrics; prints the table (and writes results.json under --out).
"""
from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from cil_platform.alignment import resolve_alignment  # noqa: E402
from cil_platform.baselines import make_baseline  # noqa: E402
from cil_platform.class_stats import ClassStatistics  # noqa: E402
from cil_platform.config import ExperimentConfig, load_config  # noqa: E402
from cil_platform.data import dataset_class_names  # noqa: E402
from cil_platform.experiment import MethodRecord, init_ray  # noqa: E402
from cil_platform.features import FeatureTable, features_for  # noqa: E402
from cil_platform.metrics import CLMetrics, evaluate_task  # noqa: E402
from cil_platform.report import format_table, write_report  # noqa: E402
from cil_platform.scenario import ClassIncremental, build_scenario  # noqa: E402
from gmm_model import create_encoder  # noqa: E402

BASELINES = list(typing.get_args(typing.get_args(ExperimentConfig.model_fields["baselines"].annotation)[0]))


def scenario_and_features(cfg: ExperimentConfig) -> tuple[ClassIncremental, FeatureTable, FeatureTable]:
    """The experiment's scenario (alignment classes held out) and its train / test features."""
    init_ray(cfg.ray_address)
    try:
        encoder = create_encoder(cfg.stack)
        all_classes = dataset_class_names(cfg.dataset)
        aligned = resolve_alignment(cfg, all_classes, encoder.width, encoder.identity)
        held_out = set(aligned.classes) if aligned else set()
        scenario = build_scenario(cfg.scenario, [c for c in all_classes if c not in held_out], cfg.seed)
        train, test = features_for(cfg, encoder.identity, scenario.class_order)
    finally:
        ray.shutdown()  # the baselines need no Ray: give its CPUs back
    return scenario, train, test


def run_arena(cfg: ExperimentConfig, names: list[str]) -> dict:
    """The results (report.py's schema) of every named baseline over the scenario."""
    scenario, train, test = scenario_and_features(cfg)
    stats = ClassStatistics()
    baselines = [make_baseline(name, stats, cfg.seed) for name in names]
    records = {name: MethodRecord() for name in names}
    tasks = []
    for task in scenario:
        tasks.append(task)
        seen = list(task.seen_classes)
        task_train = train.subset(scenario.training_mask(task, train.labels, train.keys))
        seen_test = test.select(seen)
        stats.learn(task_train)  # NCM's prototypes, learned before the baselines as run_task does
        for baseline in baselines:
            start = time.perf_counter()
            baseline.learn(task_train, seen)
            task_acc, overall = evaluate_task(baseline.predict(seen_test, seen), list(seen_test.labels), tasks)
            records[baseline.name].add(task_acc, overall, time.perf_counter() - start)
        print(f"task {task.index + 1}/{len(scenario)}: "
              + " | ".join(f"{name} {records[name].overall[-1]:.1%}" for name in names), flush=True)
    methods = {}
    for baseline in baselines:
        row = asdict(records[baseline.name])
        row["memory_bytes"] = baseline.memory_bytes
        row["metrics"] = CLMetrics.from_matrix(row["task_acc"], row["overall"]).summary()
        if hasattr(baseline, "chosen"):
            row["chosen"] = baseline.chosen  # the hyperparameter picked on each task's held-out training images
        methods[baseline.name] = row
    return {"title": f"arena (seed {cfg.seed}): {scenario.name} on {len(scenario.class_order)} classes",
            "config": {"seed": cfg.seed, "scenario": cfg.scenario.model_dump(mode="json"), "baselines": names},
            "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--baselines", nargs="+", default=BASELINES, choices=BASELINES)
    parser.add_argument("--out", help="directory for results.json and accuracy.png")
    args = parser.parse_args(argv)
    results = run_arena(load_config(args.config, args.overrides), args.baselines)
    print(results["title"])
    print(format_table(results))
    for name, row in results["methods"].items():
        if "chosen" in row:
            print(f"{name}: chosen per task {row['chosen']}")
    if args.out:
        print(f"wrote {', '.join(write_report(args.out, results).values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
