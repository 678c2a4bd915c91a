"""The optimizer and learning-rate schedule both stages use: AdamW that follows the strategy, warmup then cosine.

DeepSpeed refuses a ZeRO-Offload run whose optimizer is not its own CPU optimizer (`zero_force_ds_cpu_optimizer`,
true by default), so an offloaded optimizer is `DeepSpeedCPUAdam`; on CUDA otherwise it is fused AdamW.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

OFFLOAD_DEVICES = ("cpu", "nvme")  # where DeepSpeed's `zero_use_cpu_optimizer` asks for its own CPU optimizer


def offloads_optimizer(strategy: Any) -> bool:
    """Whether `strategy` is DeepSpeed with the optimizer offloaded (its `config` dict, as Lightning builds or loads it:
    `offload_optimizer: true` or a user config's `zero_optimization.offload_optimizer.device`)."""
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in OFFLOAD_DEVICES


def adamw(groups: list[dict[str, Any]], strategy: Any, **defaults: Any) -> torch.optim.Optimizer:
    """AdamW over parameter `groups` (same groups whichever implementation): DeepSpeed's CPU Adam in AdamW mode when
    `strategy` offloads the optimizer, fused AdamW when every parameter is on CUDA, PyTorch's default otherwise."""
    groups = [g for g in groups if g["params"]]
    if offloads_optimizer(strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its C++ op on first use

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **defaults)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True if on_cuda else None, **defaults)


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """lr multiplier: linear 0 -> 1 over `warmup` steps, cosine 1 -> `floor` until `total`, then `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float) -> dict:
    """Lightning's per-step scheduler config for `warmup_cosine` (multiplying each group's own lr)."""
    multiplier = partial(warmup_cosine, warmup=warmup, total=total, floor=floor)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier), "interval": "step"}
