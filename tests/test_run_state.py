"""The run state a resumed driver continues from: exact round trip, torn states ignored, config checks."""
from __future__ import annotations

import numpy as np
import pytest

from cil_platform.baselines import LinearHead, NearestClassMean
from cil_platform.class_stats import ClassStatistics
from cil_platform.config import ExperimentConfig
from cil_platform.features import FeatureTable
from cil_platform.replay import ExemplarMemory, NoReplay
from cil_platform.storage import open_storage
from cil_platform.storage.run_state import ConfigMismatchError, RunState, RunStateError
from cil_platform.storage.run_state import open_run_state as open_state
from cil_platform.storage.store import ProjectionStore


def open_run_state(cfg: ExperimentConfig, fresh: bool = False) -> RunState:
    return open_state(cfg.run_url, cfg.storage.options, cfg.config_hash, fresh)


def table(classes: list[str], per_class: int = 6, seed: int = 0) -> FeatureTable:
    rng = np.random.default_rng(seed)
    labels = np.asarray([c for c in classes for _ in range(per_class)], dtype=object)
    keys = np.asarray([f"{c}-{i}-{seed}" for c in classes for i in range(per_class)], dtype=object)
    features = (rng.standard_normal((len(labels), 4, 8)) + np.arange(len(labels))[:, None, None] % 3).astype(np.float16)
    return FeatureTable(features, labels, keys)


def components() -> dict:
    return {"memory": ExemplarMemory(budget=8, selection="random", seed=3), "class_stats": ClassStatistics(),
            "none": NoReplay(), "linear_sequential": LinearHead(joint=False, seed=5, epochs=3),
            "joint": LinearHead(joint=True, seed=5, epochs=3)}


def learn(parts: dict, train: FeatureTable, seen: list[str]) -> None:
    for name, part in parts.items():
        if isinstance(part, ClassStatistics):
            part.learn(train)
        elif hasattr(part, "update"):
            part.update(train)
        else:
            part.learn(train, seen)


def run_task(parts: dict, state: RunState, store: ProjectionStore, task: int, rows: dict) -> None:
    classes = [f"c{2 * task}", f"c{2 * task + 1}"]
    seen = [f"c{i}" for i in range(2 * task + 2)]
    learn(parts, table(classes, seed=task), seen)
    manifest = store.publish(task, bytes([task]) * 64, seen, "stack")
    rows["gmm"]["overall"].append(0.5 + task / 10)
    state.save(task, manifest, parts, rows, {"train_images": 10.0 * (task + 1)})


def flatten(tree, prefix=""):
    """Every leaf of a state tree as (path, value), arrays as numpy."""
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in flatten(v, f"{prefix}/{k}")]
    if isinstance(tree, (list, tuple)):
        return [kv for i, v in enumerate(tree) for kv in flatten(v, f"{prefix}/{i}")]
    return [(prefix, tree)]


def assert_same_state(a: dict, b: dict) -> None:
    for (pa, va), (pb, vb) in zip(flatten({k: v.state_dict() for k, v in a.items()}),
                                  flatten({k: v.state_dict() for k, v in b.items()}), strict=True):
        assert pa == pb
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb), pa
        else:
            assert va == vb, pa


@pytest.fixture
def run(tmp_path):
    return RunState(open_storage(str(tmp_path / "out")), "a" * 64), ProjectionStore(str(tmp_path / "out" / "store"))


def test_round_trip_restores_every_component_exactly_and_they_continue_identically(run):
    state, store = run
    original, rows = components(), {"gmm": {"overall": [], "task_acc": [[1.0]]}}
    for task in range(2):
        run_task(original, state, store, task, rows)

    restored = components()
    resumed = state.load(store, restored)
    assert resumed.next_task == 2
    assert resumed.projection == bytes([1]) * 64
    assert resumed.rows == rows and resumed.throughput == {"train_images": 20.0}
    assert_same_state(original, restored)
    # the generators continue where they stopped: a third task gives the same state and predictions
    third = table(["c4", "c5"], seed=9)
    seen = [f"c{i}" for i in range(6)]
    learn(original, third, seen)
    learn(restored, third, seen)
    assert_same_state(original, restored)
    for name in ("linear_sequential", "joint"):
        assert original[name].predict(third, seen) == restored[name].predict(third, seen)
    assert NearestClassMean(original["class_stats"]).predict(third, seen) == \
        NearestClassMean(restored["class_stats"]).predict(third, seen)
    assert original["memory"].payload()["labels"] == restored["memory"].payload()["labels"]


def test_a_state_without_its_marker_or_with_torn_arrays_is_never_loaded(run):
    state, store = run
    parts, rows = components(), {"gmm": {"overall": []}}
    for task in range(3):
        run_task(parts, state, store, task, rows)
    root = state.fs
    newest = f"{state.root}/task-0002"
    # torn arrays (the marker's sha256 no longer matches): fall back to task 1
    blob = root.cat_file(f"{newest}/arrays.safetensors")
    root.pipe_file(f"{newest}/arrays.safetensors", blob[: len(blob) // 2])
    assert state.load(store, components()).next_task == 2
    # killed between the two writes: arrays, no marker
    root.rm(f"{newest}/state.json")
    assert state.load(store, components()).next_task == 2
    # a marker that does not parse
    root.pipe_file(f"{newest}/state.json", b'{"config_hash": "a')
    assert state.load(store, components()).next_task == 2
    # saving again replaces the torn newer state
    run_task(parts, state, store, 2, rows)
    assert state.load(store, components()).next_task == 3


def test_only_the_two_newest_states_are_kept(run):
    state, store = run
    parts, rows = components(), {"gmm": {"overall": []}}
    for task in range(4):
        run_task(parts, state, store, task, rows)
    assert sorted(p.rsplit("/", 1)[-1] for p in state.fs.ls(state.root, detail=False)) == ["task-0002", "task-0003"]


def test_an_empty_output_dir_has_nothing_to_resume(run):
    state, store = run
    assert state.load(store, components()) is None
    state.check_config()  # nothing to disagree with


def test_a_state_whose_projection_changed_in_the_store_is_an_error(run):
    state, store = run
    run_task(components(), state, store, 0, {"gmm": {"overall": []}})
    store.fs.rm(f"{store.root}/v0000", recursive=True)  # versions are immutable: only a removed one can change
    store.publish(0, b"other weights", ["c0", "c1"], "stack")
    with pytest.raises(RunStateError, match="not the projection"):
        state.load(store, components())


def test_another_config_is_an_error_unless_fresh(tmp_path):
    cfg = ExperimentConfig(output_dir=str(tmp_path / "out"))
    other = ExperimentConfig(output_dir=str(tmp_path / "out"), train={"lr": 5e-4})
    state, store = open_run_state(cfg), ProjectionStore(cfg.store_url)
    run_task(components(), state, store, 0, {"gmm": {"overall": []}})
    train_dir = tmp_path / "out" / "ray_train" / cfg.config_hash[:16]
    assert cfg.train_storage_url == str(train_dir)
    train_dir.mkdir(parents=True)

    with pytest.raises(ConfigMismatchError, match="another config.*--fresh"):
        open_run_state(other)
    assert open_run_state(cfg).load(store, components()).next_task == 1  # the same config resumes
    fresh = open_run_state(other, fresh=True)
    assert fresh.load(store, components()) is None
    assert not (tmp_path / "out" / "run_state").exists() and not (tmp_path / "out" / "ray_train").exists()


def test_config_hash_ignores_where_the_run_executes_but_not_what_it_computes(tmp_path):
    base = ExperimentConfig(output_dir=str(tmp_path / "a"))
    moved = ExperimentConfig(output_dir=str(tmp_path / "b"), ray_address="auto", cache_dir=str(tmp_path / "c"),
                             dataset={"storage_options": {"anon": True}})
    assert base.config_hash == moved.config_hash
    for change in ({"seed": 1}, {"replay": {"mode": "none"}}, {"scenario": {"increment": 5}}, {"name": "x"}):
        assert ExperimentConfig(output_dir=str(tmp_path / "a"), **change).config_hash != base.config_hash, change


@pytest.mark.parametrize("marker", [
    b"[1, 2, 3]", b"null", b'"a string"', b"\xff\xfe not utf-8", b"",
    b'{"config_hash": "' + b"a" * 64 + b'"}',  # a dict without the other fields
    b'{"format": 1, "config_hash": "' + b"a" * 64 + b'", "task": 2, "next_task": 3}',  # an older format
])
def test_a_newest_marker_of_any_content_falls_back_to_the_previous_state_with_a_warning(run, marker, caplog):
    state, store = run
    parts, rows = components(), {"gmm": {"overall": []}}
    for task in range(2):
        run_task(parts, state, store, task, rows)
    state.fs.pipe_file(f"{state.root}/task-0001/state.json", marker)
    with caplog.at_level("WARNING"):
        assert state.load(store, components()).next_task == 1
        state.check_config()
    assert "task-0001" in caplog.text and "falling back" in caplog.text


def test_a_marker_edited_in_place_fails_its_own_checksum(run, caplog):
    import json

    state, store = run
    parts, rows = components(), {"gmm": {"overall": []}}
    for task in range(2):
        run_task(parts, state, store, task, rows)
    path = f"{state.root}/task-0001/state.json"
    marker = json.loads(state.fs.cat_file(path))
    marker["rows"]["gmm"]["overall"] = [1.0, 1.0]  # well-formed, not what was saved
    state.fs.pipe_file(path, json.dumps(marker).encode())
    with caplog.at_level("WARNING"):
        assert state.load(store, components()).next_task == 1
    assert "sha256 does not match its content" in caplog.text
