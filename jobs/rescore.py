"""Evaluation-time variants of GMM's rules, side by side, from the projections one finished run published.

    python jobs/rescore.py runs/demo                      # the run's config, store and feature cache
    python jobs/rescore.py /tmp/s0 --out /tmp/s0-rescore  # also writes results.json

A training run costs minutes per task; a decoding rule or a fusion weighting costs a forward of the test images.
This replays the run's class-level state task by task (class statistics, the ridge fusion's head and validation
rows, LDA), loads each task's published projection, scores the seen test images and the fusion's validation rows
once (the first-token log-probabilities, prior-corrected) and compares, on the same numbers:
- `gmm`: the prior-corrected first-token argmax (the `trie+prior` walk decides the same except among classes that
  share a first token);
- `ridge+gmm (ce)`: the trie+prior+ridge rule as the run chose it (cross-entropy on the validation rows);
- `ridge+gmm (acc)`: the weights of best validation accuracy instead (ties: the smaller generative weight);
- `ridge+gmm (new rows)`: chosen on the task's held-out real rows only, without pseudo-features of old classes;
- `ridge+gmm (z)`: z-scored ridge plus z-scored generative score, no weight chosen (as the prototype fusion);
- `lda+gmm (ce)`: the same fusion with the LDA baseline's scores instead of ridge's;
- `ridge`, `lda`: the closed-form baselines recomputed (equal to the run's).
No weight is ever chosen on test images. Prints the table (and writes results.json under --out). A tool on the
demo's small sets: it reads the run's features into memory (jobs/arena.py), as an experiment never does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cil_platform.class_stats import ClassStatistics  # noqa: E402
from cil_platform.features import pooled_unit  # noqa: E402
from cil_platform.closed_form import SharedCovariance  # noqa: E402
from cil_platform.config import ExperimentConfig  # noqa: E402
from cil_platform.fusion import GENERATIVE_WEIGHTS, RidgeFusion, choose_fusion  # noqa: E402
from cil_platform.metrics import CLMetrics, evaluate_task  # noqa: E402
from cil_platform.report import format_table, write_report  # noqa: E402
from cil_platform.storage.store import ProjectionStore  # noqa: E402
from gmm_model.classify import first_token_prior, zscore  # noqa: E402

VARIANTS = ["gmm", "ridge", "lda", "ridge+gmm (ce)", "ridge+gmm (acc)", "ridge+gmm (new rows)", "ridge+gmm (z)",
            "lda+gmm (ce)"]


def choose_by_accuracy(head: torch.Tensor, generative: torch.Tensor, targets: np.ndarray) -> tuple[float, float]:
    """(1, weight) of the best validation accuracy of head + weight * generative; the smallest weight on ties."""
    targets = torch.as_tensor(targets)
    accuracy = [float(((head + w * generative).argmax(1) == targets).double().mean()) for w in GENERATIVE_WEIGHTS]
    return 1.0, GENERATIVE_WEIGHTS[int(np.argmax(accuracy))]


def first_token_scores(gmm, rows: np.ndarray, classes: list[str], batch: int) -> torch.Tensor:
    trie = gmm.label_trie(classes)
    with torch.no_grad():
        return torch.cat([gmm.first_token_log_prob(torch.from_numpy(rows[s:s + batch].astype(np.float32)), trie)
                          for s in range(0, len(rows), batch)])


def rescore(run_dir: str) -> dict:
    from jobs.arena import scenario_and_features
    from gmm_model import create_gmm
    from gmm_model.stack import initial_projection

    results = json.loads((Path(run_dir) / "results.json").read_text())
    cfg = ExperimentConfig.model_validate(results["config"])
    if not any(rule.ridge for rule in cfg.eval.rules):
        raise ValueError(f"{run_dir} was not run with the trie+prior+ridge rule: its projections trained on every row")
    scenario, train, test = scenario_and_features(cfg)
    store = ProjectionStore(cfg.store_url, cfg.storage.options)
    stats, fusion, lda = ClassStatistics(), RidgeFusion(seed=cfg.seed), SharedCovariance(seed=cfg.seed)
    gmm, tasks = None, []
    rows = {name: {"task_acc": [], "overall": []} for name in VARIANTS}
    chosen: dict[str, list] = {name: [] for name in VARIANTS if "+" in name}
    torch.set_num_threads(cfg.train.num_workers * cfg.train.threads_per_worker)
    for task in scenario:
        tasks.append(task)
        seen = list(task.seen_classes)
        task_train = train.subset(scenario.training_mask(task, train.labels, train.keys))
        x, labels = lda.embed(task_train), np.asarray([str(c) for c in task_train.labels], dtype=object)
        lda_fit = lda.without(x, labels, fusion.held_out(task_train))
        validation = fusion.learn_and_validate(task_train, stats, seen, cfg.seed + task.index,
                                               cfg.eval.fusion_pseudo_per_class)
        stats.learn(task_train)
        lda.learn(task_train, seen)
        _, weights = store.load(task.index)
        if gmm is None:
            gmm = create_gmm(cfg.stack, train.features.shape[-1], cfg.cache_dir)
        gmm.projection = initial_projection(cfg.stack, train.features.shape[-1], gmm.llm_width, weights)
        seen_test = test.select(seen)
        prior = first_token_prior(first_token_scores(gmm, stats.matrix("mean", seen), seen, cfg.eval.batch_size))
        generative = (first_token_scores(gmm, seen_test.features, seen, cfg.eval.batch_size) - prior).double()
        held_rows = validation.held.features.astype(np.float32)
        validation_rows = np.concatenate([held_rows, validation.pseudo.reshape(-1, *held_rows.shape[1:])])
        val_generative = (first_token_scores(gmm, validation_rows, seen, cfg.eval.batch_size) - prior).double()
        embedded = pooled_unit(seen_test.features).double()
        ridge = embedded @ fusion.head(seen).double().T
        columns = torch.tensor([lda.stats.classes.index(c) for c in seen])
        lda_scores = embedded @ lda.weight[:, columns] + lda.bias[columns]
        w, b = lda.solve(lda_fit, lda.chosen[-1])
        held_embedded = F.normalize(torch.from_numpy(validation_rows).double().mean(1), dim=1)
        fit_columns = [lda_fit.classes.index(c) for c in seen]
        val_lda = held_embedded @ w[:, fit_columns] + b[fit_columns]
        new_rows = np.arange(len(validation.held))
        picks = {
            "ridge+gmm (ce)": (ridge, choose_fusion(validation.ridge_scores, val_generative, validation.targets)),
            "ridge+gmm (acc)": (ridge, choose_by_accuracy(validation.ridge_scores, val_generative, validation.targets)),
            "ridge+gmm (new rows)": (ridge, choose_fusion(validation.ridge_scores[new_rows], val_generative[new_rows],
                                                          validation.targets[new_rows])),
            "lda+gmm (ce)": (lda_scores, choose_fusion(val_lda, val_generative, validation.targets)),
        }
        scores = {"gmm": generative, "ridge": ridge, "lda": lda_scores,
                  "ridge+gmm (z)": zscore(ridge.float()) + zscore(generative.float())}
        for name, (head, (a, b_)) in picks.items():
            scores[name] = a * head + b_ * generative
            chosen[name].append([a, b_])
        truth = list(seen_test.labels)
        for name in VARIANTS:
            task_acc, overall = evaluate_task([seen[i] for i in scores[name].argmax(1).tolist()], truth, tasks)
            rows[name]["task_acc"].append(task_acc)
            rows[name]["overall"].append(overall)
        line = " | ".join(f"{n} {rows[n]['overall'][-1]:.1%}" for n in VARIANTS)
        print(f"task {task.index + 1}/{len(scenario)}: {line}", flush=True)
    methods = {name: {**row, "metrics": CLMetrics.from_matrix(row["task_acc"], row["overall"]).summary(),
                      **({"chosen": chosen[name]} if name in chosen else {})} for name, row in rows.items()}
    return {"title": f"rescore of {run_dir} (seed {cfg.seed})", "config": {"run": run_dir, "seed": cfg.seed},
            "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run's output_dir (results.json, store)")
    parser.add_argument("--out", help="directory for results.json and accuracy.png")
    args = parser.parse_args(argv)
    results = rescore(args.run)
    print(results["title"])
    print(format_table(results))
    if args.out:
        print(f"wrote {', '.join(write_report(args.out, results).values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
