"""Experiment configuration: one validated pydantic tree, loaded from YAML plus `a.b=value` overrides."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gmm_model import PRESETS, ModelStack

from .datasets import DatasetConfig
from .scenario import build_scenario
from .storage import StorageConfig, join_url

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# fields that may hold credentials: left out wherever a config is written down (model_dump(exclude=...))
CREDENTIAL_FIELDS = {"storage": {"options"}, "dataset": {"storage_options"}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScenarioConfig(Strict):
    """How the classes are cut into tasks (cil_platform/scenario.py build_scenario).

    class_incremental: B{initial}-Inc{increment}, every training image of each class.
    few_shot: a base session of `base_classes` classes with all their training images, then sessions of
    `ways` new classes with `shots` training images each (seeded choice, docs/few_shot.md).
    """

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


class AlignmentConfig(Strict):
    """Stage 1: train the projection on classes disjoint from every evaluation class."""

    enabled: bool = True
    projection: str | None = Field(None, description="safetensors file; default: shipped or built for the stack")
    num_classes: int = Field(150, ge=1)
    train_per_class: int = Field(30, ge=1)
    class_seed: int = 12345
    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1, description="new-task images per worker step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    use_gpu: bool = Field(False, description="one GPU per worker; the frozen LLM and the projection move to it")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node first (Ray's default), SPREAD "
                            "puts them on different nodes where it can")
    backend: Literal["ddp", "deepspeed"] = Field("ddp", description="how workers wrap, step and checkpoint "
                                                                    "the projection: torch DDP or DeepSpeed")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON (ZeRO stage, precision); default "
                                                           "configs/deepspeed/zero2-bf16-gpu.json with use_gpu, "
                                                           "else configs/deepspeed/zero0-fp32-cpu.json")

    @model_validator(mode="after")
    def _deepspeed(self):
        """Refuse a DeepSpeed JSON that cannot run with these settings now, not in a worker later."""
        if self.backend == "deepspeed":
            from .deepspeed_config import deepspeed_settings

            deepspeed_settings(self.deepspeed_config, self.use_gpu, self.batch_size, self.num_workers)
        elif self.deepspeed_config is not None:
            raise ValueError("train.deepspeed_config is set but train.backend is 'ddp'; set train.backend=deepspeed")
        return self


class ReplayConfig(Strict):
    """Forgetting control: none (the paper's exemplar-free form), pseudo-features from class statistics, exemplars."""

    mode: Literal["none", "pseudo", "exemplar"] = "pseudo"
    ratio: float = Field(1.0, ge=0, description="replayed samples per new sample in each batch")
    budget: int = Field(2000, ge=1, description="exemplar mode: total stored feature sets")
    selection: Literal["herding", "random"] = "herding"


class EvalConfig(Strict):
    decode: Literal["trie", "free"] = "trie"
    fuse_prototypes: bool = Field(True, description="trie only: also report the fusion with class prototypes")
    prior_correction: bool = Field(True, description="trie only: subtract the model's first-token prior, "
                                                     "estimated on the seen classes' mean features")
    batch_size: int = Field(64, ge=1)
    actors: int = Field(2, ge=1)


class ExperimentConfig(Strict):
    name: str = "demo"
    seed: int = 0
    model: ModelStack | str = Field("offline-small", validate_default=True)
    dataset: DatasetConfig = DatasetConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    train: TrainConfig = TrainConfig()
    replay: ReplayConfig = ReplayConfig()
    eval: EvalConfig = EvalConfig()
    baselines: list[Literal["ncm", "linear_sequential", "joint"]] = ["ncm", "linear_sequential", "joint"]
    output_dir: str = "runs/{name}"
    cache_dir: str = Field(default_factory=lambda: os.environ.get("GMM_CIL_CACHE", "~/.cache/gmm-cil"))
    store_url: str | None = Field(None, description="projection store; default <run_url>/store")
    storage: StorageConfig = Field(default_factory=StorageConfig,
                                   description="where the run's store, checkpoints and feature cache live, and "
                                               "the fsspec options for all of them (docs/storage.md)")
    ray_address: str | None = None
    announce_url: str | None = Field(None, description="a running serve/ app to tell of every new version "
                                                       "(bearer token from $GMM_CIL_SERVE_TOKEN)")

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value):
        """A preset name, or a mapping with `preset:` plus fields that override it."""
        if isinstance(value, str):
            value = {"preset": value}
        if isinstance(value, dict) and "preset" in value:
            value = dict(value)
            name = value.pop("preset")
            if name not in PRESETS:
                raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
            return ModelStack.model_validate({**PRESETS[name].model_dump(), **value})
        return value

    @model_validator(mode="after")
    def _paths(self):
        try:
            self.output_dir = self.output_dir.format(name=self.name)
        except (KeyError, IndexError) as error:
            raise ValueError(f"output_dir {self.output_dir!r}: only {{name}} may be substituted") from error
        self.cache_dir = str(Path(self.cache_dir).expanduser())
        if self.store_url is None:
            self.store_url = join_url(self.run_url, "store")
        return self

    @property
    def run_url(self) -> str:
        """This run's own storage (store, Ray Train checkpoints): <storage.url>/<name>, or output_dir when local."""
        return join_url(self.storage.url, self.name) if self.storage.url else self.output_dir

    @property
    def features_url(self) -> str:
        """The feature cache, shared by runs (keyed by encoder identity): <storage.url>/features, or the cache_dir."""
        return join_url(self.storage.url, "features") if self.storage.url else str(Path(self.cache_dir) / "features")

    @property
    def stack(self) -> ModelStack:
        assert isinstance(self.model, ModelStack)
        return self.model


def apply_override(tree: dict, assignment: str) -> None:
    """`train.lr=3e-4` -> tree["train"]["lr"] = 3e-4 (the value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    *parents, leaf = path.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    for assignment in overrides:
        apply_override(tree, assignment)
    return ExperimentConfig.model_validate(tree)
