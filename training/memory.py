"""How much memory a process has, and whether a model's training state fits in it before it is built.

``--dim 1048576`` would otherwise end in an allocator traceback (or the OOM killer) after the data
set was encoded. The model is built on PyTorch's ``meta`` device, which allocates nothing, so the
parameter count is exact for every size option without a formula kept in step with ``dit.py``.
"""

from __future__ import annotations

import logging
import os

import torch

from aaa_core.dit import AAADiT, AAADiTConfig
from aaa_core.errors import InputError

log = logging.getLogger(__name__)

ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, each in the parameter's dtype


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; elsewhere half the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits


def processes_on_this_machine() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def training_bytes(config: AAADiTConfig, dtype: torch.dtype, ema: bool) -> tuple[int, int]:
    """``(parameters, bytes)`` that the weights, their gradients, AdamW's moments and the float32 EMA take."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AAADiT(config).parameters())
    per_parameter = (2 + ADAMW_MOMENTS) * dtype.itemsize + (4 if ema else 0)
    return parameters, parameters * per_parameter


def check_model_fits(config: AAADiTConfig, dtype: torch.dtype, ema: bool, device: torch.device, shards: int = 1) -> None:
    """Refuses, with the figures, a model whose training state cannot fit in the memory ``device`` has now.

    ``shards``: the processes that split the state between them (FSDP); activations and the data
    come on top, so passing this check does not promise the run fits, only that it could.
    """
    parameters, needed = training_bytes(config, dtype, ema)
    needed //= shards
    if device.type == "cuda":
        available, _ = torch.cuda.mem_get_info(device)
        where = f"free on {device}"
    else:
        available = available_memory() // processes_on_this_machine()
        where = "of memory available per process"
    if needed > available:
        raise InputError(
            f"dim {config.dim}, depth {config.depth}: the model has {parameters:,} parameters, whose weights, "
            f"gradients, AdamW state{' and EMA' if ema else ''} take {needed / 1e9:,.1f} GB, more than the "
            f"{available / 1e9:,.1f} GB {where}; choose a smaller --model, --dim or --depth"
        )
