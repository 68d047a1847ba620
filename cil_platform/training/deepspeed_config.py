"""The DeepSpeed JSON config of a fit: read from the repo (or a user path), checked against the training config.

ZeRO stage and precision are DeepSpeed's business and come from the JSON. The batch geometry is ours:
the training loop steps the optimizer once per batch of `train.batch_size` new images per worker, so
the JSON's batch keys are filled from the training config ("auto" or absent) or must agree with it.
The optimizer and LR schedule are ours too (torch AdamW + warm-up cosine, passed to
`deepspeed.initialize`), so a JSON that defines its own is refused rather than silently ignored.
Pure Python: the driver validates configs without importing DeepSpeed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..paths import REPO_ROOT

GPU_DEFAULT = "configs/deepspeed/zero2-bf16-gpu.json"
CPU_DEFAULT = "configs/deepspeed/zero0-fp32-cpu.json"
AUTO = "auto"


def deepspeed_config_path(path: str | None, use_gpu: bool) -> Path:
    """The JSON file: `path` as given (absolute or from the current directory), else from the repository
    root; None picks the default for the device."""
    name = path or (GPU_DEFAULT if use_gpu else CPU_DEFAULT)
    for candidate in (Path(name).expanduser(), REPO_ROOT / name):
        if candidate.is_file():
            return candidate
    raise ValueError(f"DeepSpeed config {name!r} not found (looked in the current directory and {REPO_ROOT})")


def _enabled(ds: dict, section: str) -> bool:
    value = ds.get(section, {})
    return bool(value.get("enabled", False)) if isinstance(value, dict) else bool(value)


def _agree(ds: dict, key: str, expected: int, source: Path, ours: str) -> None:
    value = ds.get(key, AUTO)
    if value != AUTO and value != expected:
        raise ValueError(f"DeepSpeed config {source}: {key}={value!r} disagrees with {ours}={expected}; "
                         f"set it to {expected} or \"auto\"")


def deepspeed_settings(path: str | None, use_gpu: bool, batch_size: int, workers: int) -> dict:
    """The config dict handed to `deepspeed.initialize` for a fit of `workers` workers."""
    source = deepspeed_config_path(path, use_gpu)
    try:
        ds = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"DeepSpeed config {source}: cannot read it as JSON ({error})") from error
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {source}: expected a JSON object, got {type(ds).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"DeepSpeed config {source}: remove the {section!r} section; the optimizer (AdamW) "
                             "and the LR schedule (warm-up cosine) come from train.lr, train.weight_decay "
                             "and train.warmup_fraction")
    if _enabled(ds, "fp16") and _enabled(ds, "bf16"):
        raise ValueError(f"DeepSpeed config {source}: fp16 and bf16 are both enabled; pick one")
    if _enabled(ds, "fp16") and not use_gpu:
        raise ValueError(f"DeepSpeed config {source}: fp16 is not supported on CPU (DeepSpeed's CPU accelerator "
                         "runs fp32 or bf16); disable fp16 or set train.use_gpu=true")
    _agree(ds, "train_micro_batch_size_per_gpu", batch_size, source, "train.batch_size")
    _agree(ds, "gradient_accumulation_steps", 1, source, "the optimizer steps per batch")
    _agree(ds, "train_batch_size", batch_size * workers, source, "train.batch_size x workers")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return {**ds, "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": batch_size * workers,
            # we always pass a torch optimizer; ZeRO would otherwise refuse it as "untested"
            "zero_allow_untested_optimizer": ds.get("zero_allow_untested_optimizer", stage > 0)}


def low_precision(ds: dict) -> str | None:
    """"bfloat16", "float16" or None (fp32): the dtype DeepSpeed keeps the projection in, as torch names it."""
    return next((dtype for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")) if _enabled(ds, section)), None)
