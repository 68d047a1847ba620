"""Experiment reports: results as JSON, an accuracy-per-task plot and a plain-text table.

Results schema (accuracies are fractions; metrics may be None):
    {"title": str,
     "methods": {name: {"overall": [float, ...], "task_acc": [[float, ...], ...],
                        "metrics": {"average_incremental_accuracy", "last_accuracy",
                                    "average_forgetting", "backward_transfer"},
                        "memory_bytes": int | None, "seconds": float | None}}}
"""
from __future__ import annotations

import io
import json

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .storage import open_storage

_COLUMNS = ["method", "avg inc acc %", "last acc %", "avg forgetting %", "BWT %", "memory bytes", "seconds"]
_METRICS = ["average_incremental_accuracy", "last_accuracy", "average_forgetting", "backward_transfer"]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(results: dict) -> str:
    """One row per method, aligned columns; missing values print as '-'."""
    rows = [_COLUMNS]
    for name, method in results.get("methods", {}).items():
        metrics = method.get("metrics") or {}
        memory, seconds = method.get("memory_bytes"), method.get("seconds")
        rows.append([name, *(_percent(metrics.get(key)) for key in _METRICS),
                     "-" if memory is None else str(int(memory)),
                     "-" if seconds is None else f"{seconds:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _plot(results: dict) -> bytes:
    # A bare Figure on the Agg canvas: no pyplot, so no global figure state or backend switching.
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, method in results.get("methods", {}).items():
        overall = method.get("overall") or []
        if overall:
            axes.plot(range(1, len(overall) + 1), [100 * a for a in overall], marker="o", label=name)
    axes.set_xlabel("task")
    axes.set_ylabel("accuracy on seen classes (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    axes.set_title(results.get("title") or "class-incremental accuracy")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def write_report(out_dir: str, results: dict, storage_options: dict | None = None) -> dict[str, str]:
    """Write results.json and accuracy.png under out_dir (any fsspec URL); returns their paths."""
    storage = open_storage(out_dir, storage_options)
    fs, root = storage.fs, storage.path.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    paths = {"results": f"{root}/results.json", "plot": f"{root}/accuracy.png"}
    fs.pipe(paths["results"], json.dumps(results, indent=2).encode())
    fs.pipe(paths["plot"], _plot(results))
    if storage.is_local:
        return paths
    return {key: fs.unstrip_protocol(path) for key, path in paths.items()}
