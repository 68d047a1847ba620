"""How a training worker wraps, steps and checkpoints the projection: torch DDP or DeepSpeed.

The worker body (worker.py) is the same for both: it builds the projection, a torch AdamW and the
warm-up cosine schedule, hands them to a backend and from then on only calls `step(loss)` and
`save(directory, epoch, rank)`. Only the projection goes into DDP or the DeepSpeed engine; the
frozen LLM stays outside it, with no gradients and no optimizer state (`frozen_llm_check`).

Checkpoints (one per epoch, through Ray Train) always hold the projection as fp32 safetensors
(PROJECTION_FILE, what the driver returns and the store publishes) plus what the backend needs to
resume: DDP the optimizer and scheduler states (rank 0 only, they are replicated); DeepSpeed its
own `save_checkpoint` layout, written by every rank (under ZeRO each rank holds a shard of the
optimizer state) and merged by Ray Train into one checkpoint directory.
"""
from __future__ import annotations

import resource
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from gmm_model import GMM, Projection

PROJECTION_FILE = "projection.safetensors"
STATE_FILE = "trainer_state.pt"  # DDP: optimizer, scheduler, epoch
DEEPSPEED_TAG = "deepspeed"  # the sub-directory DeepSpeed's save_checkpoint writes


class DDPBackend:
    """torch DDP on Ray Train's process group (gloo on CPU, nccl on GPU); a single worker runs unwrapped."""

    def __init__(self, projection: Projection, optimizer: torch.optim.Optimizer, scheduler, world_size: int):
        self.projection, self.optimizer, self.scheduler = projection, optimizer, scheduler
        self.module = ray.train.torch.prepare_model(projection) if world_size > 1 else projection

    def restore(self, directory: Path) -> int:
        """Load a checkpoint this backend wrote; returns the epoch to start from."""
        self.projection.load_file(directory / PROJECTION_FILE)  # in place: DDP's replicas see it too
        # weights_only: a checkpoint on shared storage is data, never code (torch's unpickler refuses anything
        # but tensors and plain containers); optimizer and LambdaLR states are exactly that
        state = torch.load(directory / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["epoch"] + 1

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def full_projection_bytes(self) -> bytes:
        return self.projection.to_bytes()

    def save(self, directory: Path, epoch: int, rank: int) -> None:
        if rank != 0:  # every rank holds the same replicated state
            return
        self.projection.save_file(directory / PROJECTION_FILE)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "epoch": epoch}, directory / STATE_FILE)


class DeepSpeedBackend:
    """`deepspeed.initialize` on the projection with our torch optimizer and schedule (no fused_adam build);
    ZeRO stage and precision come from `settings`. DeepSpeed finds Ray Train's process group already
    initialised and reuses it (gloo on CPU)."""

    def __init__(self, projection: Projection, optimizer: torch.optim.Optimizer, scheduler, settings: dict):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            # DeepSpeed's CPU comm backend would JIT-compile a shared-memory all-reduce (a C++ build of a
            # minute or more on a fresh machine, in every worker) that only its *inference* all-reduce
            # uses; training all-reduces go through torch.distributed (gloo). Mark it unavailable.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, _, _, _ = deepspeed.initialize(model=projection, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=settings)
        self.module = self.engine
        self._shape = (projection.in_features, projection.out_features)

    def restore(self, directory: Path) -> int:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint (tag {DEEPSPEED_TAG!r}) in {directory}")
        return client_state["epoch"] + 1

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # optimizer step, scheduler step and zeroing of the gradients

    def save(self, directory: Path, epoch: int, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={"epoch": epoch},
                                    save_latest=False)
        weights = self.full_projection_bytes()  # a collective under ZeRO: every rank takes part
        if rank == 0:
            (directory / PROJECTION_FILE).write_bytes(weights)

    def full_projection_bytes(self) -> bytes:
        """The whole projection in fp32 as safetensors: DeepSpeed's master copy under bf16/fp16 or ZeRO, else the
        module's own. A collective under ZeRO-3: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        snapshot = Projection(*self._shape)
        weights = {}
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            weights[name] = (param if full is None else full).detach().float().cpu()
        snapshot.load_state_dict(weights)
        return snapshot.to_bytes()


def make_backend(name: str, projection: Projection, optimizer, scheduler, world_size: int,
                 deepspeed_settings: dict | None):
    if name == "ddp":
        return DDPBackend(projection, optimizer, scheduler, world_size)
    if name == "deepspeed":
        return DeepSpeedBackend(projection, optimizer, scheduler, deepspeed_settings)
    raise ValueError(f"unknown training backend {name!r}; known: ddp, deepspeed")


def frozen_llm_check(gmm: GMM, optimizer: torch.optim.Optimizer) -> dict:
    """Fail if the frozen LLM needs gradients; count the projection's parameters (ZeRO-3 partitions them:
    ds_numel is the full count) and what the optimizer holds on this rank (the projection, or under
    ZeRO-1/2/3 this rank's shard of it)."""
    trainable = [name for name, param in gmm.llm.named_parameters() if param.requires_grad]
    if trainable:
        raise RuntimeError(f"the frozen LLM has {len(trainable)} trainable tensors (e.g. {trainable[0]})")
    return {"projection_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in gmm.projection.parameters()),
            "optimizer_parameters": sum(p.numel() for group in optimizer.param_groups for p in group["params"])}


def worker_memory(device: torch.device, optimizer: torch.optim.Optimizer) -> dict:
    """Peak memory of this worker process: RSS (Linux reports KiB) and, on GPU, torch's peak allocation;
    plus the bytes of optimizer state this rank keeps."""
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "optimizer_state_mb": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                        for t in state.values() if torch.is_tensor(t)) / 2 ** 20}
    if device.type == "cuda":
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return memory


def gather_per_worker(values: dict, world_size: int) -> dict:
    """{"x": v} on every rank -> {"x_per_worker": [v of rank 0, v of rank 1, ...]} (rank 0's report is the one kept)."""
    gathered = [values]
    if world_size > 1 and dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, values)
    return {f"{key}_per_worker": [round(g[key], 3) for g in gathered] for key in values}
