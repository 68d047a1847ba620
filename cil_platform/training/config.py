"""How projection updates are run: optimizer, batch geometry, workers, placement and the backend (DDP or DeepSpeed).

Validated when the experiment config is, so a DeepSpeed JSON that cannot run fails before Ray starts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .deepspeed_config import deepspeed_settings


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1, description="new-task images per worker step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(2, ge=1, description="the session's workers: they train every task and evaluate it")
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train may make in one session "
                                                   "(each resumes the update in flight from its last epoch)")
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
            deepspeed_settings(self.deepspeed_config, self.use_gpu, self.batch_size, self.num_workers)
        elif self.deepspeed_config is not None:
            raise ValueError("train.deepspeed_config is set but train.backend is 'ddp'; set train.backend=deepspeed")
        return self
