"""What changes when accelerate shards the model (FSDP2): full state dicts out, shards back in.

Under DDP every process holds the whole model and these functions are the usual
``state_dict()`` / ``load_state_dict()``. Under FSDP2 (``accelerate launch --config_file
training/configs/fsdp.yaml``) each parameter is a ``DTensor`` of which a process holds one
slice. The trainer's files keep one layout either way: checkpoints and states hold full,
unsharded tensors under ``AAADiT.state_dict()``'s keys and the optimizer's usual layout, so a
state saved under FSDP resumes under DDP, on one process or under FSDP with another process
count, and every checkpoint loads in ComfyUI. Gathering is a collective: every process calls
these functions at the same point, and only the one that writes keeps the result. Loading gives
each process its slice of the full tensors it read itself (no communication).

The EMA is kept sharded like the weights (:func:`shard_like`): each process averages its own
slices, with no communication and 1/N of the memory, where a full copy per process would cost
every process the whole float32 model that FSDP is there to spread out.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from aaa_core.dit import AAADiT, AAADiTConfig
from aaa_core.errors import InputError

from .processes import Processes

log = logging.getLogger(__name__)


def check_setup(accelerator: Accelerator, lora: bool) -> None:
    """Refuses the FSDP set-ups the trainer does not support; warns when FSDP was asked for but is not on."""
    if accelerator.distributed_type == DistributedType.FSDP:
        version = accelerator.state.fsdp_plugin.fsdp_version
        if version != 2:
            raise InputError(f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                             "(as training/configs/fsdp.yaml does) or pass --fsdp_version 2 to accelerate launch")
        if lora:
            raise InputError("--lora-rank with FSDP: a LoRA run trains a few MB of adapters, which need no sharding; "
                             "launch it without FSDP (accelerate launch --multi_gpu ...)")
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.is_main_process:
        # accelerate turns FSDP on for GPU-like devices only; CPU processes silently stay DDP (MULTI_CPU).
        log.warning("FSDP was asked for, but accelerate runs these %s processes as %s without sharding: every "
                    "process holds the whole model", accelerator.device.type, accelerator.distributed_type.value)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_like(replica: nn.Module | None, model: nn.Module) -> nn.Module | None:
    """Turns the parameters of ``replica`` (a same-structured full copy such as the EMA) into shards like ``model``'s."""
    if replica is None or not is_sharded(model):
        return replica
    layout = dict(model.named_parameters())
    for name, param in list(replica.named_parameters()):
        like = layout[name]
        if isinstance(like, DTensor):
            owner_name, _, attr = name.rpartition(".")
            shard = distribute_tensor(param.detach(), like.device_mesh, like.placements, src_data_rank=None)
            setattr(replica.get_submodule(owner_name), attr, nn.Parameter(shard, requires_grad=param.requires_grad))
    return replica


def _full(value: Any) -> Any:
    """A sharded tensor gathered into a full one on the CPU (a collective); anything else as it is."""
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with full tensors; call on every process, ``keep`` on the one that uses it."""
    gathered = {name: _full(value) for name, value in module.state_dict().items()}
    return gathered if keep else {}


def load_full_state_dict(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(tensors)`` (strict) from full tensors; a sharded module takes its slices."""
    own = module.state_dict()
    module.load_state_dict({name: _shard_like(value, own.get(name)) for name, value in tensors.items()})


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full moment tensors; call on every process."""
    state = optimizer.state_dict()
    moments = {index: {key: _full(value) for key, value in entry.items()} for index, entry in state["state"].items()}
    return {**state, "state": moments} if keep else {}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` from full moments; sharded parameters take their slices."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = state.get("state", {})
    if isinstance(moments, dict):  # anything else is left to load_state_dict to refuse
        for index, entry in moments.items():
            like = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
            if isinstance(entry, dict):
                moments[index] = {key: _shard_like(value, like) for key, value in entry.items()}
    optimizer.load_state_dict(state)


def _shard_like(value: Any, like: Any) -> Any:
    """``value``'s slice for this process if ``like`` is a sharded tensor of its shape; else ``value``."""
    if not (isinstance(like, DTensor) and isinstance(value, torch.Tensor) and value.shape == like.shape):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def reshard_after_forward(model: nn.Module) -> None:
    """Puts a sharded model's parameters back into shards after forward passes with no backward (validation).

    FSDP2 keeps the root module's parameters gathered after its forward pass, expecting the
    backward to use them; without one they would stay full tensors next to the sharded ones.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


def sampling_model(module: nn.Module, config: AAADiTConfig, keep: bool) -> nn.Module | None:
    """A model the main process can sample with alone: ``module`` itself, or a full copy of a sharded one.

    Call on every process (gathering is a collective); the others get None.
    """
    if not is_sharded(module):
        return module
    tensors = full_state_dict(module, keep)
    if not keep:
        return None
    device = next(module.parameters()).device
    full = AAADiT(config).to(device=device, dtype=next(iter(tensors.values())).dtype)
    full.load_state_dict(tensors)
    return full.eval().requires_grad_(False)


def processes_of(accelerator: Accelerator, stop_requested: Callable[[], bool]) -> Processes:
    """The launched processes as accelerate sees them, with this process's stop flag."""
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, stop_requested,
                     any_true=functools.partial(_any_true, accelerator), main_value=functools.partial(_main_value, accelerator))


def _any_true(accelerator: Accelerator, flag: bool) -> bool:
    """``flag`` or-ed across the processes (a reduction: call on every process)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


def _main_value(accelerator: Accelerator, value: int) -> int:
    """The main process's ``value`` on every process (a broadcast: call on every process)."""
    if accelerator.num_processes == 1:
        return value
    return int(broadcast(torch.tensor([value], dtype=torch.int64, device=accelerator.device), from_process=0).item())
