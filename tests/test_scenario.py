import numpy as np
import pytest

from cil_platform.scenario import ClassIncremental, FewShotIncremental, Task

NAMES = [f"c{i:03d}" for i in range(100)]


def test_b0_inc10_cuts_ten_tasks_of_ten():
    scenario = ClassIncremental(NAMES, initial=0, increment=10)
    assert scenario.name == "B0-Inc10"
    assert len(scenario) == 10
    tasks = list(scenario)
    assert [len(t.new_classes) for t in tasks] == [10] * 10
    assert [t.index for t in tasks] == list(range(10))
    assert [len(t.seen_classes) for t in tasks] == list(range(10, 101, 10))
    assert sorted(tasks[-1].seen_classes) == NAMES


def test_b50_inc10_has_six_tasks_with_a_big_first_one():
    scenario = ClassIncremental(NAMES, initial=50, increment=10)
    assert scenario.name == "B50-Inc10"
    assert [len(t.new_classes) for t in scenario] == [50, 10, 10, 10, 10, 10]


def test_seen_classes_are_the_concatenation_of_new_classes_in_order():
    scenario = ClassIncremental(NAMES, initial=20, increment=40)
    order = scenario.class_order
    assert scenario[0] == Task(0, tuple(order[:20]), tuple(order[:20]))
    assert scenario[1] == Task(1, tuple(order[20:60]), tuple(order[:60]))
    assert scenario[-1].seen_classes == tuple(order)
    with pytest.raises(IndexError):
        scenario[3]


def test_order_is_a_seeded_permutation_of_the_sorted_names():
    shuffled_input = list(reversed(NAMES))
    scenario = ClassIncremental(shuffled_input, initial=0, increment=10, order_seed=7)
    expected = [NAMES[i] for i in np.random.default_rng(7).permutation(100)]
    assert scenario.class_order == expected
    assert ClassIncremental(NAMES, 0, 10, order_seed=7).class_order == expected  # input order irrelevant
    assert ClassIncremental(NAMES, 0, 10, order_seed=8).class_order != expected
    assert ClassIncremental(shuffled_input, 0, 10, order_seed=None).class_order == NAMES


def test_explicit_class_order_wins_and_may_be_a_subset():
    order = ["c005", "c001", "c003", "c000"]
    scenario = ClassIncremental(NAMES, initial=2, increment=1, class_order=order, order_seed=3)
    assert scenario.class_order == order
    assert [t.new_classes for t in scenario] == [("c005", "c001"), ("c003",), ("c000",)]


def test_class_order_errors_name_the_offending_classes():
    with pytest.raises(ValueError, match="nope"):
        ClassIncremental(NAMES, 0, 1, class_order=["c000", "nope"])
    with pytest.raises(ValueError, match="duplicates.*c001"):
        ClassIncremental(NAMES, 0, 1, class_order=["c001", "c002", "c001"])
    with pytest.raises(ValueError, match="duplicates.*x"):
        ClassIncremental(["x", "y", "x"], 0, 1)


def test_num_classes_truncates_the_order():
    scenario = ClassIncremental(NAMES, initial=0, increment=5, num_classes=20, order_seed=1)
    full = ClassIncremental(NAMES, initial=0, increment=5, order_seed=1)
    assert scenario.class_order == full.class_order[:20]
    assert len(scenario) == 4
    with pytest.raises(ValueError, match="only 100"):
        ClassIncremental(NAMES, 0, 10, num_classes=101)


@pytest.mark.parametrize("initial,increment,message", [
    (0, 0, "increment"), (-1, 10, "initial"), (101, 10, "initial=101"),
    (0, 30, "partial"), (50, 20, "partial"),
])
def test_invalid_cuts_are_rejected(initial, increment, message):
    with pytest.raises(ValueError, match=message):
        ClassIncremental(NAMES, initial=initial, increment=increment)


def test_initial_equal_to_all_classes_is_one_task():
    scenario = ClassIncremental(NAMES[:10], initial=10, increment=5)
    assert len(scenario) == 1
    assert len(scenario[0].new_classes) == 10
    assert scenario.shots_for(0) is None


def test_few_shot_sessions_and_shots():
    scenario = FewShotIncremental(NAMES, base_classes=60, ways=5, shots=5)
    assert scenario.name == "FS-B60-5w5s"
    assert len(scenario) == 9
    assert [len(t.new_classes) for t in scenario] == [60] + [5] * 8
    assert scenario.shots_for(0) is None
    assert [scenario.shots_for(i) for i in range(1, 9)] == [5] * 8
    assert all(isinstance(t, Task) for t in scenario)
    with pytest.raises(IndexError):
        scenario.shots_for(9)


def test_few_shot_validation():
    with pytest.raises(ValueError, match="partial"):
        FewShotIncremental(NAMES, base_classes=60, ways=7, shots=5)
    with pytest.raises(ValueError, match="shots"):
        FewShotIncremental(NAMES, base_classes=60, ways=5, shots=0)
    with pytest.raises(ValueError, match="base_classes"):
        FewShotIncremental(NAMES, base_classes=0, ways=5, shots=5)
