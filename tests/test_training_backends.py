"""The DDP backend's checkpoint in one process: an exact round trip, and a checkpoint that would run code is refused."""
from __future__ import annotations

import pickle

import pytest
import torch

from cil_platform.training.backends import STATE_FILE, DDPBackend
from cil_platform.training.worker import warmup_cosine
from gmm_model import Projection


def backend(seed: int) -> DDPBackend:
    torch.manual_seed(seed)
    projection = Projection(6, 4)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=1e-2)
    return DDPBackend(projection, optimizer, warmup_cosine(optimizer, 10, 0.2), world_size=1)


def train_steps(b: DDPBackend, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        x = torch.full((3, 6), float(step + 1))
        b.step(b.module(x).square().mean())


def test_a_restored_backend_continues_exactly_as_the_uninterrupted_one(tmp_path):
    uninterrupted, saved = backend(0), backend(0)
    train_steps(uninterrupted, 5)
    train_steps(saved, 3)
    saved.save(tmp_path, epoch=2, rank=0)
    restored = backend(1)  # other initial weights: everything must come from the checkpoint
    assert restored.restore(tmp_path) == 3
    train_steps(restored, 2, first=3)
    for a, b in zip(uninterrupted.projection.parameters(), restored.projection.parameters()):
        assert torch.equal(a, b)
    assert restored.scheduler.get_last_lr() == uninterrupted.scheduler.get_last_lr()


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    b = backend(0)
    b.save(tmp_path, epoch=0, rank=0)
    with open(tmp_path / STATE_FILE, "wb") as handle:  # a planted state file on the shared storage
        pickle.dump({"optimizer": Payload(), "scheduler": {}, "epoch": 0}, handle)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        backend(0).restore(tmp_path)
