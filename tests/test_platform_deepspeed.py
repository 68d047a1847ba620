"""The DeepSpeed training backend: config validation, and real fits on CPU (QuickDraw features,
EfficientNet-Lite0, SmolLM2, Ray Train with 2 gloo workers) against the DDP backend."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.train
import torch
import torch.distributed as dist

from cil_platform.config import ExperimentConfig, TrainConfig
from cil_platform.data import DatasetConfig, dataset_class_names, load_dataset
from cil_platform.training.deepspeed_config import deepspeed_config_path, deepspeed_settings, low_precision
from cil_platform.experiment import init_ray
from cil_platform.features import FeatureTable
from cil_platform.training.worker import session_worker_loop
from cil_platform.training.fit import FitSpec, fit_projection
from gmm_model import ModelStack, Projection, create_encoder, create_gmm

# Same seed, same shards, same schedule: ZeRO-0/fp32 DeepSpeed and DDP both average the two workers'
# gradients by a gloo all-reduce and step the same torch AdamW, so they can differ only by floating-point
# summation order. Measured here: max |difference| 0.0 (bit-identical). The tolerance leaves room for
# other reduction orders; a lost optimizer state or a mis-averaged gradient moves weights by ~lr = 5e-3.
WEIGHT_TOLERANCE = 1e-6
LR = 5e-3


# ---------------------------------------------------------------- config validation (no Ray)

def write_json(tmp_path, tree: dict, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(tree))
    return str(path)


def test_default_json_follows_the_device_and_batch_keys_are_filled():
    cpu = deepspeed_settings(None, use_gpu=False, batch_size=6, workers=2)
    assert cpu["zero_optimization"]["stage"] == 0 and low_precision(cpu) is None
    assert (cpu["train_micro_batch_size_per_gpu"], cpu["gradient_accumulation_steps"], cpu["train_batch_size"]) == (6, 1, 12)
    gpu = deepspeed_settings(None, use_gpu=True, batch_size=16, workers=4)
    assert low_precision(gpu) == "bfloat16" and gpu["zero_optimization"]["stage"] == 2
    assert gpu["train_batch_size"] == 64 and gpu["zero_allow_untested_optimizer"] is True
    assert deepspeed_config_path(None, use_gpu=False).name == "zero0-fp32-cpu.json"
    assert deepspeed_config_path(None, use_gpu=True).name == "zero2-bf16-gpu.json"
    assert json.loads(deepspeed_config_path(None, False).read_text())["train_micro_batch_size_per_gpu"] == "auto"


def test_fp16_on_cpu_is_refused_by_the_config(tmp_path):
    path = write_json(tmp_path, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        TrainConfig(backend="deepspeed", deepspeed_config=path)
    assert low_precision(deepspeed_settings(path, use_gpu=True, batch_size=4, workers=1)) == "float16"  # fine on GPU


@pytest.mark.parametrize("tree,problem", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 disagrees with train.batch_size=8"),
    ({"train_batch_size": 8}, "train_batch_size=8 disagrees with train.batch_size x workers=16"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 disagrees"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
])
def test_json_that_disagrees_with_the_training_config_is_refused(tmp_path, tree, problem):
    path = write_json(tmp_path, tree)
    with pytest.raises(ValueError, match=problem):
        ExperimentConfig.model_validate({"train": {"backend": "deepspeed", "deepspeed_config": path,
                                                   "batch_size": 8, "num_workers": 2}})
    matching = {**tree, "train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}
    if "micro" in problem or "x workers" in problem:  # the same JSON with agreeing numbers is accepted
        TrainConfig(backend="deepspeed", deepspeed_config=write_json(tmp_path, matching, "ok.json"),
                    batch_size=8, num_workers=2)


def test_missing_or_unreadable_json_and_a_json_without_deepspeed_are_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TrainConfig(backend="deepspeed", deepspeed_config=str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        TrainConfig(backend="deepspeed", deepspeed_config=str(broken))
    with pytest.raises(ValueError, match="train.backend is 'ddp'"):
        TrainConfig(deepspeed_config="configs/deepspeed/zero0-fp32-cpu.json")
    # a repository-relative path works from any current directory
    assert TrainConfig(backend="deepspeed", deepspeed_config="configs/deepspeed/zero2-fp32-cpu.json").backend == "deepspeed"


# ---------------------------------------------------------------- real fits (Ray Train, 2 CPU workers)

STACK = ModelStack()
CACHE_DIR = str(Path(os.environ.get("GMM_CIL_CACHE", "~/.cache/gmm-cil")).expanduser())


@pytest.fixture(scope="module")
def ray_session():
    init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task(ray_session) -> tuple[FeatureTable, bytes]:
    """Frozen-encoder features of 12 drawings of each of 2 QuickDraw classes, and a seeded starting projection."""
    config = DatasetConfig(kind="quickdraw", train_per_class=12, test_per_class=0)
    classes = dataset_class_names(config)[:2]
    rows = load_dataset(config, classes=classes).train.dataset.take_all()
    encoder = create_encoder(STACK).eval()
    with torch.no_grad():
        features = encoder.encode([np.asarray(r["image"]) for r in rows]).numpy().astype(np.float16)
    table = FeatureTable(features, np.asarray([r["label"] for r in rows], dtype=object),
                         np.asarray([r["key"] for r in rows], dtype=object))
    torch.manual_seed(0)
    return table, Projection(encoder.width, 576).to_bytes()


def fit(task, tmp_path, backend: str, deepspeed_config: str | None = None, **kwargs):
    features, start = task
    train_cfg = TrainConfig(epochs=2, batch_size=6, lr=LR, num_workers=2, backend=backend,
                            deepspeed_config=deepspeed_config)
    spec = FitSpec(name="task-000", features=features, start=start, stack=STACK,
                   visual_width=features.features.shape[-1], cache_dir=CACHE_DIR, train=train_cfg,
                   storage_url=str(tmp_path / f"ray-{backend}"), seed=7)
    return fit_projection(spec, **kwargs)


def weights(blob: bytes) -> torch.Tensor:
    projection = Projection(1280, 576).load_bytes(blob)
    return torch.cat([projection.weight.detach().flatten(), projection.bias.detach()])


@pytest.fixture(scope="module")
def ddp_and_zero0(task, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fits")
    return fit(task, tmp, "ddp"), fit(task, tmp, "deepspeed", "configs/deepspeed/zero0-fp32-cpu.json")


@pytest.mark.e2e
def test_deepspeed_fit_changes_the_projection_and_the_loss_falls(task, ddp_and_zero0):
    features, start = task
    _, zero0 = ddp_and_zero0
    change = (weights(zero0.projection) - weights(start)).abs().max().item()
    assert change > 100 * WEIGHT_TOLERANCE
    gmm = create_gmm(STACK, 1280, CACHE_DIR, start)
    visual, labels = torch.from_numpy(features.features.astype(np.float32)), list(features.labels)
    with torch.no_grad():
        before = gmm.loss(visual, labels).item()
        gmm.projection.load_bytes(zero0.projection)
        after = gmm.loss(visual, labels).item()
    assert after < 0.95 * before, (before, after)  # 4 steps from a random projection
    # the frozen LLM is outside the engine: the optimizer holds the projection and nothing else
    metrics = zero0.metrics
    assert metrics["projection_parameters"] == metrics["optimizer_parameters"] == 1280 * 576 + 576
    assert len(metrics["peak_rss_mb_per_worker"]) == 2 and min(metrics["peak_rss_mb_per_worker"]) > 100
    # AdamW keeps two fp32 moments per projection parameter (plus a step counter per tensor)
    assert metrics["optimizer_state_mb_per_worker"][0] == pytest.approx(2 * 4 * (1280 * 576 + 576) / 2 ** 20, rel=1e-3)


@pytest.mark.e2e
def test_zero0_fp32_deepspeed_matches_ddp_with_the_same_seed(task, ddp_and_zero0):
    ddp, zero0 = ddp_and_zero0
    difference = (weights(zero0.projection) - weights(ddp.projection)).abs().max().item()
    assert difference < WEIGHT_TOLERANCE, difference
    assert zero0.loss == pytest.approx(ddp.loss, rel=1e-4)
    assert zero0.images == ddp.images == 24 * 2


def fail_once_after_first_checkpoint(config: dict, marker: str) -> None:
    """session_worker_loop whose first attempt dies on every rank right after the first epoch's checkpoint."""
    real_report = ray.train.report

    def report(metrics, checkpoint=None, **kwargs):
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        if not os.path.exists(marker):
            dist.barrier()  # every rank has checked the marker before rank 0 writes it
            if ray.train.get_context().get_world_rank() == 0:
                Path(marker).touch()
            raise RuntimeError("injected failure after the first checkpoint")

    ray.train.report = report
    try:
        session_worker_loop(config)
    finally:
        ray.train.report = real_report


@pytest.mark.e2e
@pytest.mark.slow
def test_zero2_checkpoint_restores_after_a_worker_failure(task, ddp_and_zero0, tmp_path):
    """ZeRO-2 shards the optimizer state over the ranks: each writes its shard into the Ray Train checkpoint.
    Resumed from it, the run ends where the uninterrupted ZeRO-0 run ends."""
    marker = tmp_path / "failed-once"
    resumed = fit(task, tmp_path, "deepspeed", "configs/deepspeed/zero2-fp32-cpu.json",
                  worker_loop=lambda config: fail_once_after_first_checkpoint(config, str(marker)))
    assert marker.exists()
    assert resumed.metrics["start_epoch"] == 1  # the restarted group loaded epoch 0's checkpoint
    _, zero0 = ddp_and_zero0
    difference = (weights(resumed.projection) - weights(zero0.projection)).abs().max().item()
    assert difference < WEIGHT_TOLERANCE, difference
    # ZeRO-2: each rank's optimizer holds half the projection (flat, padded), so half the AdamW state
    half = (1280 * 576 + 576) / 2
    assert half <= resumed.metrics["optimizer_parameters"] <= half + 64
    assert resumed.metrics["optimizer_state_mb_per_worker"][1] == pytest.approx(
        zero0.metrics["optimizer_state_mb_per_worker"][1] / 2, rel=1e-3)
