import json

import pytest

from cil_platform.metrics import CLMetrics, evaluate_task
from cil_platform.scenario import Task

TASKS = [Task(0, ("a", "b"), ("a", "b")), Task(1, ("c",), ("a", "b", "c"))]

# Three tasks, hand-checked numbers.
TASK_ACC = [
    [0.9],
    [0.7, 0.8],
    [0.6, 0.5, 1.0],
]
OVERALL = [0.9, 0.75, 0.7]


def test_evaluate_task_row_and_overall():
    labels = ["a", "a", "b", "b", "c", "c", "c", "c"]
    predictions = ["a", "b", "b", "b", "c", "a", "c", "x"]
    row, overall = evaluate_task(predictions, labels, TASKS)
    assert row == pytest.approx([3 / 4, 2 / 4])
    assert overall == pytest.approx(5 / 8)


def test_evaluate_task_validates():
    with pytest.raises(ValueError, match="predictions"):
        evaluate_task(["a"], ["a", "b"], TASKS)
    with pytest.raises(ValueError, match="not in any task"):
        evaluate_task(["a", "z"], ["a", "z"], TASKS)
    with pytest.raises(ValueError, match=r"tasks \[1\]"):
        evaluate_task(["a", "b"], ["a", "b"], TASKS)
    with pytest.raises(ValueError, match="no test images"):
        evaluate_task([], [], TASKS)


def test_average_incremental_and_last_accuracy():
    metrics = CLMetrics.from_matrix(TASK_ACC, OVERALL)
    assert metrics.average_incremental_accuracy == pytest.approx((0.9 + 0.75 + 0.7) / 3)
    assert metrics.last_accuracy == pytest.approx(0.7)


def test_average_forgetting_uses_the_best_earlier_accuracy():
    metrics = CLMetrics.from_matrix(TASK_ACC, OVERALL)
    # task 0: best before the end = max(0.9, 0.7) = 0.9, final 0.6 -> 0.3
    # task 1: best before the end = 0.8, final 0.5 -> 0.3
    assert metrics.average_forgetting == pytest.approx(0.3)
    # the max matters: task 0 dipped then recovered before being forgotten
    recovered = CLMetrics.from_matrix([[0.5], [0.8, 0.9], [0.4, 0.9, 1.0]], [0.5, 0.85, 0.7])
    assert recovered.average_forgetting == pytest.approx(((0.8 - 0.4) + 0.0) / 2)


def test_backward_transfer_compares_with_just_after_learning():
    metrics = CLMetrics.from_matrix(TASK_ACC, OVERALL)
    # task 0: 0.6 - 0.9 = -0.3; task 1: 0.5 - 0.8 = -0.3
    assert metrics.backward_transfer == pytest.approx(-0.3)
    positive = CLMetrics.from_matrix([[0.5], [0.7, 0.6]], [0.5, 0.65])
    assert positive.backward_transfer == pytest.approx(0.2)
    assert positive.average_forgetting == pytest.approx(-0.2)


def test_single_task_has_no_forgetting_or_transfer():
    metrics = CLMetrics.from_matrix([[0.8]], [0.8])
    assert metrics.average_forgetting is None
    assert metrics.backward_transfer is None
    assert metrics.last_accuracy == pytest.approx(0.8)


def test_to_dict_is_json_ready_and_complete():
    data = CLMetrics.from_matrix(TASK_ACC, OVERALL).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["overall"] == OVERALL
    assert data["task_acc"] == TASK_ACC
    assert data["metrics"]["average_forgetting"] == pytest.approx(0.3)
    assert set(data["metrics"]) == {"average_incremental_accuracy", "last_accuracy",
                                    "average_forgetting", "backward_transfer"}


@pytest.mark.parametrize("task_acc,overall,message", [
    ([], [], "empty"),
    ([[0.9], [0.8]], [0.9, 0.8], "row 1"),
    ([[0.9], [0.8, 0.7]], [0.9], "overall has 1"),
    ([[90.0]], [0.9], r"\[0, 1\]"),
    ([[0.9]], [float("nan")], r"\[0, 1\]"),
])
def test_from_matrix_validates(task_acc, overall, message):
    with pytest.raises(ValueError, match=message):
        CLMetrics.from_matrix(task_acc, overall)


def test_rows_from_evaluate_task_feed_from_matrix():
    rows, overall = [], []
    labels0, labels1 = ["a", "b"], ["a", "b", "c", "c"]
    for tasks, preds, labels in [(TASKS[:1], ["a", "b"], labels0), (TASKS, ["a", "a", "c", "a"], labels1)]:
        row, acc = evaluate_task(preds, labels, tasks)
        rows.append(row)
        overall.append(acc)
    metrics = CLMetrics.from_matrix(rows, overall)
    assert metrics.task_acc == [[1.0], [0.5, 0.5]]
    assert metrics.average_forgetting == pytest.approx(0.5)
    assert metrics.average_incremental_accuracy == pytest.approx(0.75)
