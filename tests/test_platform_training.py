"""The pure parts of per-task training: the LR schedule and the per-worker sharding of an epoch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cil_platform.training.worker import epoch_batches, rank_rows, warmup_cosine


def lrs(total: int, warmup_fraction: float, base: float = 2.0, steps: int | None = None) -> list[float]:
    """The LR used by each optimizer step 0..steps-1 (the scheduler steps after each optimizer step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = warmup_cosine(optimizer, total, warmup_fraction)
    out = []
    for _ in range(total if steps is None else steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_rises_linearly_then_cosine_decays():
    total, base = 20, 2.0
    got = lrs(total, 0.2, base, steps=total + 1)  # warm-up of int(20 * 0.2) = 4 steps
    # linear warm-up: (step + 1) / 4
    assert got[:4] == pytest.approx([base * 0.25, base * 0.5, base * 0.75, base * 1.0])
    # cosine from the peak over the remaining 16 steps
    for step in range(4, total + 1):
        progress = (step - 4) / 16
        assert got[step] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * progress))), step
    assert got[4] == pytest.approx(base)
    assert got[12] == pytest.approx(base * 0.5)  # half way through the decay
    assert got[20] == pytest.approx(0.0, abs=1e-12)  # the end of the schedule
    assert got[19] < 0.02 * base  # the last step actually taken is close to zero
    # monotone: non-decreasing in warm-up, non-increasing after
    assert all(a <= b for a, b in zip(got[:4], got[1:5]))
    assert all(a >= b for a, b in zip(got[4:], got[5:]))


def test_warmup_is_at_least_one_step_and_schedule_clamps_after_the_end():
    got = lrs(10, 0.0, base=1.0, steps=14)
    assert got[0] == pytest.approx(1.0)  # warm-up of max(1, 0) = 1 step reaches the peak at once
    assert got[1] == pytest.approx(1.0)  # the decay starts from the peak
    assert got[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))
    assert got[10:] == pytest.approx([0.0] * 4, abs=1e-12)  # past the end: stays at zero, no rebound


def test_warmup_fraction_rounds_down():
    got = lrs(10, 0.25, base=1.0, steps=3)  # int(2.5) = 2 warm-up steps
    assert got == pytest.approx([0.5, 1.0, 1.0])


@pytest.mark.parametrize("count,world,batch", [(103, 2, 16), (100, 4, 7), (64, 1, 64), (9, 3, 2), (17, 5, 4)])
def test_rank_rows_are_disjoint_equal_and_batches_cover_them(count, world, batch):
    per_worker = count // world
    rows = [rank_rows(count, world, rank, seed=7) for rank in range(world)]
    assert [len(r) for r in rows] == [per_worker] * world
    everything = np.concatenate(rows)
    assert len(np.unique(everything)) == len(everything) == per_worker * world  # disjoint
    assert everything.min() >= 0 and everything.max() < count
    batches = epoch_batches(per_worker, batch, np.random.default_rng([7, 0, 0]))
    assert len(batches) == math.ceil(per_worker / batch)  # the same number of steps on every rank
    assert all(len(b) == batch for b in batches[:-1]) and all(0 < len(b) <= batch for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(per_worker))


def test_rows_and_batches_are_deterministic_per_seed_and_differ_across_seeds():
    assert rank_rows(50, 2, 1, seed=3).tolist() == rank_rows(50, 2, 1, seed=3).tolist()
    assert rank_rows(50, 2, 1, seed=3).tolist() != rank_rows(50, 2, 1, seed=4).tolist()
    a, b, c = (epoch_batches(25, 8, np.random.default_rng(s)) for s in ([3, 1, 0], [3, 1, 0], [3, 1, 1]))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]  # another epoch, another order
    assert np.concatenate(a).tolist() != list(range(25))  # shuffled


def test_fewer_rows_than_workers_gives_no_rows():
    assert len(rank_rows(1, 2, 0, seed=0)) == 0 and len(rank_rows(1, 2, 1, seed=0)) == 0
    assert epoch_batches(0, 4, np.random.default_rng(0)) == []
