"""Class-incremental scenarios: how the label space is cut into tasks, and nothing else.

A scenario is an iterable of `Task`s (Continuum-style). Everything downstream (training, evaluation,
the projection store) only ever sees `Task` objects, so a new protocol is a new class here.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Task:
    """One step of a scenario: the classes it introduces and every class seen up to and including it."""

    index: int
    new_classes: tuple[str, ...]
    seen_classes: tuple[str, ...]


def _duplicates(names: Sequence[str]) -> list[str]:
    return sorted(name for name, count in Counter(names).items() if count > 1)


def resolve_class_order(class_names: Sequence[str], num_classes: int | None = None,
                        order_seed: int | None = 0, class_order: Sequence[str] | None = None) -> list[str]:
    """The scenario's class order: explicit `class_order`, else a seeded permutation of the sorted names.

    Sorting first makes the order depend only on the set of names and the seed, not on how the
    dataset happened to list them. `order_seed=None` keeps the sorted order.
    """
    if duplicates := _duplicates(class_names):
        raise ValueError(f"class_names contains duplicates: {duplicates}")
    if class_order is not None:
        if duplicates := _duplicates(class_order):
            raise ValueError(f"class_order contains duplicates: {duplicates}")
        known = set(class_names)
        if unknown := [name for name in class_order if name not in known]:
            raise ValueError(f"class_order names classes not in the dataset: {unknown}")
        order = list(class_order)
    else:
        order = sorted(class_names)
        if order_seed is not None:
            order = [order[i] for i in np.random.default_rng(order_seed).permutation(len(order))]
    if num_classes is not None:
        if num_classes < 1 or num_classes > len(order):
            raise ValueError(f"num_classes={num_classes} but only {len(order)} classes are available")
        order = order[:num_classes]
    if not order:
        raise ValueError("a scenario needs at least one class")
    return order


class ClassIncremental:
    """B{initial}-Inc{increment}: a first task of `initial` classes (or `increment` if initial=0),
    then tasks of `increment` new classes each until the class order is used up."""

    def __init__(self, class_names: Sequence[str], initial: int, increment: int,
                 num_classes: int | None = None, order_seed: int | None = 0,
                 class_order: Sequence[str] | None = None):
        if increment < 1:
            raise ValueError(f"increment must be >= 1, got {increment}")
        if initial < 0:
            raise ValueError(f"initial must be >= 0, got {initial}")
        order = resolve_class_order(class_names, num_classes, order_seed, class_order)
        if initial > len(order):
            raise ValueError(f"initial={initial} is more than the {len(order)} classes in the scenario")
        first = initial or increment
        remainder = (len(order) - first) % increment if len(order) >= first else len(order)
        if remainder:
            raise ValueError(f"{len(order)} classes do not divide into a first task of {first} and tasks of "
                             f"{increment}: the last task would be partial ({remainder} classes)")
        self.initial, self.increment = initial, increment
        self._order = order
        bounds = [0, *range(first, len(order) + 1, increment)]
        self._tasks = [Task(index=i, new_classes=tuple(order[lo:hi]), seen_classes=tuple(order[:hi]))
                       for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]

    @property
    def class_order(self) -> list[str]:
        return list(self._order)

    @property
    def name(self) -> str:
        return f"B{self.initial}-Inc{self.increment}"

    def shots_for(self, task_index: int) -> int | None:
        """Training images per class for a task; None means all of them (always, in plain CIL)."""
        self[task_index]  # IndexError for an unknown task
        return None

    def training_mask(self, task: Task, labels: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        """Which of the training images (given by label and content key) task `task` trains on:
        every image of its new classes (all of them in plain CIL; few-shot keeps `shots` per class)."""
        return np.isin(np.asarray(labels, dtype=object), list(task.new_classes))

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __getitem__(self, index: int) -> Task:
        return self._tasks[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self._order)} classes, {len(self)} tasks)"


class FewShotIncremental(ClassIncremental):
    """Few-shot CIL: a base session of `base_classes` classes with all their training images, then
    sessions of `ways` new classes with `shots` training images per class. The tasks are cut exactly
    like B{base}-Inc{ways}; only the per-task shot budget differs."""

    def __init__(self, class_names: Sequence[str], base_classes: int, ways: int, shots: int,
                 num_classes: int | None = None, order_seed: int | None = 0,
                 class_order: Sequence[str] | None = None, shot_seed: int = 0):
        if base_classes < 1:
            raise ValueError(f"base_classes must be >= 1, got {base_classes}")
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        super().__init__(class_names, initial=base_classes, increment=ways, num_classes=num_classes,
                         order_seed=order_seed, class_order=class_order)
        self.ways, self.shots, self.shot_seed = ways, shots, shot_seed

    @property
    def name(self) -> str:
        return f"FS-B{self.initial}-{self.ways}w{self.shots}s"

    def shots_for(self, task_index: int) -> int | None:
        """Training images per class for a task; None means all of them (the base session)."""
        task = self[task_index]  # IndexError for an unknown task
        return None if task.index == 0 else self.shots

    def training_mask(self, task: Task, labels: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        """The base session trains on every image of its classes; a later session on `shots` images
        per new class: those with the smallest sha1(shot_seed, content key). The choice depends only
        on the seed and the images themselves (not on listing order or on other classes), and a class
        with fewer than `shots` training images is an error rather than a quietly smaller session."""
        mask = super().training_mask(task, labels, keys)
        shots = self.shots_for(task.index)
        if shots is None:
            return mask
        labels, keys = np.asarray(labels, dtype=object), np.asarray(keys, dtype=object)
        keep = np.zeros(len(labels), dtype=bool)
        for name in task.new_classes:
            members = np.flatnonzero(mask & (labels == name))
            if len(members) < shots:
                raise ValueError(f"session {task.index}: class {name!r} has {len(members)} training images, "
                                 f"fewer than shots={shots}")
            rank = sorted(members, key=lambda i: (_shot_rank(self.shot_seed, keys[i]), i))
            keep[rank[:shots]] = True
        return keep


def _shot_rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode("utf-8")).hexdigest()


def build_scenario(config: "ScenarioConfig", class_names: Sequence[str], seed: int = 0) -> ClassIncremental:
    """The scenario the config describes, over `class_names`; `seed` picks the few-shot images."""
    if config.kind == "few_shot":
        return FewShotIncremental(class_names, config.base_classes, config.ways, config.shots, config.num_classes,
                                  config.order_seed, config.class_order, shot_seed=seed)
    return ClassIncremental(class_names, config.initial, config.increment, config.num_classes, config.order_seed,
                            config.class_order)


class ScenarioConfig(BaseModel):
    """How the classes are cut into tasks (build_scenario below).

    class_incremental: B{initial}-Inc{increment}, every training image of each class.
    few_shot: a base session of `base_classes` classes with all their training images, then sessions of
    `ways` new classes with `shots` training images each (seeded choice, docs/few_shot.md).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["class_incremental", "few_shot"] = "class_incremental"
    num_classes: int | None = Field(100, ge=1)
    initial: int = Field(0, ge=0, description="classes in the first task; 0 = same as increment")
    increment: int = Field(10, ge=1)
    base_classes: int | None = Field(None, ge=1, description="few_shot: classes of the base session")
    ways: int | None = Field(None, ge=1, description="few_shot: new classes per incremental session")
    shots: int | None = Field(None, ge=1, description="few_shot: training images per new class")
    order_seed: int | None = 0
    class_order: list[str] | None = None

    @model_validator(mode="after")
    def _cuts(self):
        few_shot = {"base_classes", "ways", "shots"}
        if self.kind == "few_shot":
            if missing := sorted(name for name in few_shot if getattr(self, name) is None):
                raise ValueError(f"scenario kind few_shot needs {', '.join(missing)}")
            if given := sorted({"initial", "increment"} & self.model_fields_set):
                raise ValueError(f"scenario kind few_shot is cut by base_classes and ways, not {', '.join(given)}")
        elif given := sorted(name for name in few_shot if getattr(self, name) is not None):
            raise ValueError(f"{', '.join(given)} only apply to scenario kind few_shot (kind: {self.kind})")
        if self.num_classes is not None and self.class_order is None:
            build_scenario(self, [str(i) for i in range(self.num_classes)])  # the cuts must add up: fail before loading
        return self
