"""Closed-form baselines on synthetic Gaussian classes with one shared, strongly anisotropic covariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cil_platform.baselines import NearestClassMean
from cil_platform.class_stats import ClassStatistics
from cil_platform.features import pooled_unit
from cil_platform.closed_form import CLOSED_FORM, RIDGE_GRID, RanPAC, Ridge, SharedCovariance, holdout_mask
from cil_platform.features import FeatureTable
from cil_platform.storage import open_storage
from cil_platform.storage.run_state import RunState
from cil_platform.storage.store import ProjectionStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices (tests/conftest.py)

T, D = 2, 16
TASKS = [[f"c{3 * t + i}" for i in range(3)] for t in range(3)]
CLASSES = [c for task in TASKS for c in task]


def make(name: str, **kwargs):
    """Small random projection for ranpac: the tests check the algebra, not the capacity."""
    return CLOSED_FORM[name](**({"dim": 64} if name == "ranpac" else {}), **kwargs)


@pytest.fixture(scope="module")
def geometry():
    """Class means close together around a common centre, and a shared covariance whose standard deviations
    span 100x in random directions: cosine nearest-mean confuses the classes, a whitening classifier does not."""
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.standard_normal((D, D)))[0]
    scales = np.geomspace(1.5, 0.015, D)
    centre = np.zeros(D)
    centre[0] = 4.0
    offsets = 0.25 * rng.standard_normal((len(CLASSES), D))
    return centre + offsets, rotation * scales


def synthetic(geometry, per_class: int, seed: int, classes=CLASSES) -> FeatureTable:
    means, mixing = geometry
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for name in classes:
        noise = rng.standard_normal((per_class, D)) @ mixing.T
        rows.append(means[CLASSES.index(name)] + noise[:, None, :] + 0.005 * rng.standard_normal((per_class, T, D)))
        labels += [name] * per_class
    keys = [f"{seed:04d}-{name}-{i}" for i, name in enumerate(labels)]
    return FeatureTable(np.concatenate(rows).astype(np.float16), np.asarray(labels, dtype=object),
                        np.asarray(keys, dtype=object))


@pytest.fixture(scope="module")
def data(geometry):
    return synthetic(geometry, 40, seed=1), synthetic(geometry, 40, seed=2)


def run_tasks(method, train: FeatureTable, test: FeatureTable | None = None) -> list[list[str]]:
    predictions, seen = [], []
    for task in TASKS:
        seen = seen + task
        method.learn(train.select(task), seen)
        if test is not None:
            predictions.append(method.predict(test.select(seen), seen))
    return predictions


def accuracy(predicted, truth) -> float:
    return float(np.mean([p == str(t) for p, t in zip(predicted, truth)]))


def reference(name: str, table: FeatureTable, param: float, projection: torch.Tensor | None) -> np.ndarray:
    """The classifier's weights fitted in one go from the feature vectors themselves (no statistics)."""
    x = pooled_unit(table.features).double().numpy()
    if projection is not None:
        x = np.maximum(x @ projection.numpy(), 0)
    classes = list(dict.fromkeys(table.labels))
    y = np.stack([table.labels == c for c in classes], axis=1).astype(np.float64)
    if name in ("ridge", "ranpac"):
        return np.linalg.solve(x.T @ x + param * np.eye(x.shape[1]), x.T @ y)
    means = np.stack([x[table.labels == c].mean(0) for c in classes])
    centred = x - means[[classes.index(c) for c in table.labels]]
    cov = centred.T @ centred / (len(x) - len(classes))
    shrunk = (1 - param) * cov + param * np.trace(cov) / D * np.eye(D)
    return np.linalg.solve(shrunk, means.T)


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_incremental_statistics_equal_a_batch_fit_on_all_seen_data(name, data):
    train, test = data
    incremental = make(name)
    run_tasks(incremental, train)
    seen = train.select(CLASSES)
    batch = make(name, grid=(incremental.chosen[-1],))
    batch.learn(seen, CLASSES)
    assert incremental.stats.classes == batch.stats.classes == CLASSES
    assert np.array_equal(incremental.stats.counts, batch.stats.counts)
    np.testing.assert_allclose(incremental.stats.gram, batch.stats.gram, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(incremental.stats.sums, batch.stats.sums, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(incremental.weight.numpy(), batch.weight.numpy(), rtol=1e-6, atol=1e-8)
    expected = reference(name, seen, incremental.chosen[-1], getattr(incremental, "projection", None))
    np.testing.assert_allclose(incremental.weight.numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert incremental.predict(test, CLASSES) == batch.predict(test, CLASSES)


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_beats_nearest_class_mean_under_a_shared_anisotropic_covariance(name, data):
    train, test = data
    ncm = NearestClassMean(ClassStatistics())
    method = make(name)
    seen = []
    for task in TASKS:
        seen = seen + task
        ncm.stats.learn(train.select(task))
        method.learn(train.select(task), seen)
    ncm_acc = accuracy(ncm.predict(test, CLASSES), test.labels)
    method_acc = accuracy(method.predict(test, CLASSES), test.labels)
    assert ncm_acc < 0.7 and method_acc > ncm_acc + 0.15, (ncm_acc, method_acc)
    # restricted to the classes passed as seen
    assert set(method.predict(test, TASKS[0])) <= set(TASKS[0])


def test_holdout_is_a_seeded_per_class_fifth_independent_of_row_order(data):
    train, _ = data
    mask = holdout_mask(train.labels, train.keys, seed=0)
    for name in CLASSES:
        assert mask[train.labels == name].sum() == 8  # round(0.2 * 40)
    order = np.random.default_rng(5).permutation(len(train))
    assert np.array_equal(holdout_mask(train.labels[order], train.keys[order], seed=0), mask[order])
    assert not np.array_equal(holdout_mask(train.labels, train.keys, seed=1), mask)
    tiny = np.asarray(["a", "b", "b"], dtype=object)  # a lone image is never held out, nor a class's last one
    assert holdout_mask(tiny, np.asarray(["k0", "k1", "k2"], dtype=object), seed=0).tolist().count(True) == 1


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_the_hyperparameter_is_chosen_on_training_data_whatever_the_test_set(name, data, geometry):
    train, test = data
    other_test = synthetic(geometry, 7, seed=11)
    a, b = make(name), make(name)
    run_tasks(a, train, test)
    run_tasks(b, train, other_test)
    assert a.chosen == b.chosen and len(a.chosen) == len(TASKS)
    assert torch.equal(a.weight, b.weight)
    assert len(set(a.chosen)) >= 1 and all(p in a.grid for p in a.chosen)


def test_ridge_lambda_is_the_argmin_of_the_held_out_error_of_the_first_task(data):
    train, _ = data
    first = train.select(TASKS[0])
    ridge = Ridge()
    ridge.learn(first, TASKS[0])
    held = holdout_mask(first.labels, first.keys, seed=0)
    x = pooled_unit(first.features).double().numpy()
    y = np.stack([first.labels == c for c in TASKS[0]], axis=1).astype(np.float64)
    errors = [np.mean((x[held] @ np.linalg.solve(x[~held].T @ x[~held] + lam * np.eye(D), x[~held].T @ y[~held])
                       - y[held]) ** 2) for lam in RIDGE_GRID]
    assert ridge.chosen == [RIDGE_GRID[int(np.argmin(errors))]]


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_state_round_trips_through_the_run_state_and_continues_identically(name, data, tmp_path):
    train, test = data
    state, store = RunState(open_storage(str(tmp_path / "out")), "a" * 64), ProjectionStore(str(tmp_path / "store"))
    original, restored = make(name), make(name)
    seen = []
    for index, task in enumerate(TASKS[:2]):
        seen = seen + task
        original.learn(train.select(task), seen)
        state.save(index, store.publish(index, b"w" * 8, seen, "stack"), {name: original}, {}, {})
    state.load(store, {name: restored})
    assert restored.chosen == original.chosen
    for key, value in original.stats.state_dict().items():
        saved = restored.stats.state_dict()[key]
        assert np.array_equal(saved, value) and (not isinstance(value, np.ndarray) or saved.dtype == value.dtype)
    assert torch.equal(restored.weight, original.weight) and torch.equal(restored.bias, original.bias)
    seen = seen + TASKS[2]
    for method in (original, restored):
        method.learn(train.select(TASKS[2]), seen)
    assert restored.chosen == original.chosen
    assert torch.equal(restored.weight, original.weight)
    assert restored.predict(test, seen) == original.predict(test, seen)


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_memory_is_the_bytes_of_the_statistics(name, data):
    train, _ = data
    method = make(name)
    assert method.memory_bytes == 0
    run_tasks(method, train)
    width = 64 if name == "ranpac" else D
    arrays = [v for v in method.state_dict()["stats"].values() if isinstance(v, np.ndarray)]
    assert method.memory_bytes == sum(a.nbytes for a in arrays) == 8 * (width * width + len(CLASSES) * (width + 1))
    assert method.name == name


def test_ranpac_projection_is_seeded_and_not_stored(data):
    train, _ = data
    a, b, c = RanPAC(seed=3, dim=32), RanPAC(seed=3, dim=32), RanPAC(seed=4, dim=32)
    for method in (a, b, c):
        method.learn(train.select(TASKS[0]), TASKS[0])
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert a.projection.shape == (D, 32) and a.stats.gram.shape == (32, 32)
    assert "projection" not in a.state_dict()


def test_lda_at_full_shrinkage_is_euclidean_nearest_mean(data):
    train, test = data
    lda = SharedCovariance(grid=(1.0,))
    lda.learn(train, CLASSES)
    x, means = pooled_unit(test.features).double(), torch.from_numpy(lda.stats.sums / lda.stats.counts[:, None])
    nearest = torch.cdist(x, means).argmin(1).tolist()
    assert lda.predict(test, CLASSES) == [CLASSES[i] for i in nearest]


def test_registered_as_baselines_of_the_experiment():
    from cil_platform.baselines import make_baseline
    from cil_platform.config import ExperimentConfig

    for name, kind in CLOSED_FORM.items():
        made = make_baseline(name, ClassStatistics(), seed=7)
        assert isinstance(made, kind) and made.name == name and made.seed == 7
    assert ExperimentConfig(baselines=["ridge", "ranpac", "lda"]).baselines == ["ridge", "ranpac", "lda"]


@pytest.mark.parametrize("name", ["ridge", "ranpac", "lda"])
def test_the_grid_solved_at_once_equals_each_value_solved_alone(name, data):
    """`choose` compares solve_grid's classifiers (ridge: one eigendecomposition for every lambda); each must be
    the one `solve` fits for that value, at every lambda from 1e-8 to 1e8, up to what the system's conditioning
    allows two backward-stable solvers to differ by (ranpac's 64-d expansion is nearly singular at small lambda)."""
    train, _ = data
    method = make(name)
    method.learn(train.select(TASKS[0]), TASKS[0])
    gram = torch.from_numpy(method.stats.gram)
    for param, (weight, bias) in zip(method.grid, method.solve_grid(method.stats), strict=True):
        alone, alone_bias = method.solve(method.stats, param)
        scale = float(alone.abs().max())
        condition = float(torch.linalg.cond(gram + param * torch.eye(len(gram), dtype=gram.dtype))) if (
            name != "lda") else 1.0
        torch.testing.assert_close(weight, alone, atol=1e-12 * condition * scale + 1e-12, rtol=0)
        torch.testing.assert_close(bias, alone_bias, atol=1e-9 * max(scale, 1.0), rtol=0)
