"""Continual-learning metrics from the accuracy matrix of per-task evaluations.

`task_acc[t][j]` is the accuracy on the test images of task j's classes after training task t (j <= t);
`overall[t]` is the accuracy on all seen-so-far test images after task t. Accuracies are fractions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .scenario import Task


def evaluate_task(predictions: Sequence[str], labels: Sequence[str],
                  tasks_so_far: Sequence[Task]) -> tuple[list[float], float]:
    """Row t of the accuracy matrix, and overall[t], from predicted and true class names.

    Every label must belong to one of `tasks_so_far`, and every task must have at least one test
    image: an empty task would make its accuracy undefined and the matrix silently wrong.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no test images to evaluate")
    if not tasks_so_far:
        raise ValueError("no tasks to evaluate against")
    task_of = {name: j for j, task in enumerate(tasks_so_far) for name in task.new_classes}
    if unknown := sorted({label for label in labels if label not in task_of}):
        raise ValueError(f"labels of classes not in any task so far: {unknown[:10]}")
    correct, total = [0] * len(tasks_so_far), [0] * len(tasks_so_far)
    for predicted, actual in zip(predictions, labels):
        j = task_of[actual]
        total[j] += 1
        correct[j] += predicted == actual
    if empty := [j for j, n in enumerate(total) if n == 0]:
        raise ValueError(f"tasks {empty} have no test images")
    return [c / n for c, n in zip(correct, total)], sum(correct) / len(labels)


def _check_matrix(task_acc: Sequence[Sequence[float]], overall: Sequence[float]) -> None:
    if not task_acc:
        raise ValueError("the accuracy matrix is empty")
    if len(overall) != len(task_acc):
        raise ValueError(f"overall has {len(overall)} entries but task_acc has {len(task_acc)} rows")
    for t, row in enumerate(task_acc):
        if len(row) != t + 1:
            raise ValueError(f"task_acc row {t} has {len(row)} entries, expected {t + 1}")
    values = [a for row in task_acc for a in row] + list(overall)
    if bad := [a for a in values if not 0.0 <= a <= 1.0]:
        raise ValueError(f"accuracies must be fractions in [0, 1], got {bad[:5]}")


@dataclass(frozen=True)
class CLMetrics:
    """The accuracy matrix and the summary numbers derived from it.

    Forgetting and backward transfer compare a task against its later selves, so with a single task
    they are None (undefined), not 0.0 (which would claim "measured, and nothing was forgotten").
    """

    task_acc: list[list[float]]
    overall: list[float]
    average_incremental_accuracy: float
    last_accuracy: float
    average_forgetting: float | None
    backward_transfer: float | None

    @classmethod
    def from_matrix(cls, task_acc: Sequence[Sequence[float]], overall: Sequence[float]) -> "CLMetrics":
        _check_matrix(task_acc, overall)
        acc = [list(map(float, row)) for row in task_acc]
        last = len(acc) - 1
        old = range(last)  # tasks j < T-1, the ones that can have been forgotten
        forgetting = [max(acc[t][j] for t in range(j, last)) - acc[last][j] for j in old]
        transfer = [acc[last][j] - acc[j][j] for j in old]
        return cls(
            task_acc=acc,
            overall=[float(a) for a in overall],
            average_incremental_accuracy=sum(overall) / len(overall),
            last_accuracy=float(overall[-1]),
            average_forgetting=sum(forgetting) / len(forgetting) if last else None,
            backward_transfer=sum(transfer) / len(transfer) if last else None,
        )

    def summary(self) -> dict[str, float | None]:
        return {
            "average_incremental_accuracy": self.average_incremental_accuracy,
            "last_accuracy": self.last_accuracy,
            "average_forgetting": self.average_forgetting,
            "backward_transfer": self.backward_transfer,
        }

    def to_dict(self) -> dict:
        """JSON-ready, in the shape of one method's entry in a report's results["methods"]."""
        return {"overall": list(self.overall), "task_acc": [list(row) for row in self.task_acc],
                "metrics": self.summary()}
