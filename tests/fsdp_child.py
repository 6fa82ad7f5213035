"""Runs ``python -m training`` under torchrun with the DiT sharded by torch's FSDP2, on CPU processes.

accelerate turns FSDP on only for GPU-like devices: CPU processes stay DDP (``MULTI_CPU``) even
with ``--use_fsdp``. So this child does on the CPU what accelerate's FSDP2 ``prepare`` does on
GPUs: ``fully_shard`` on every block and on the root, over one gloo mesh, and the optimizer
switched to the sharded parameters. Everything after ``prepare`` is the trainer's own code.

    torchrun --nproc_per_node 2 tests/fsdp_child.py TRAINER_ARGS [--then TRAINER_ARGS ...]

runs each trainer command in turn in the same processes (one process-group start for all).
"""

from __future__ import annotations

import logging
import sys

from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import training.train

log = logging.getLogger("fsdp_child")


class ShardingAccelerator(Accelerator):
    """accelerate's CPU processes, with ``prepare`` sharding the model as accelerate's FSDP2 does."""

    def prepare(self, model, optimizer):
        mesh = init_device_mesh("cpu", (self.num_processes,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer.param_groups[0]["params"] = list(model.parameters())  # the DTensors that replaced the tensors
        held = sum(p.to_local().numel() for p in model.parameters())
        log.warning("rank %d holds %d of %d parameter elements", self.process_index, held,
                    sum(p.numel() for p in model.parameters()))
        return model, optimizer

    def end_training(self):
        """Keeps the process group for the next command (a fresh one would need a fresh rendezvous)."""
        self.wait_for_everyone()


def main(argv: list[str]) -> int:
    training.train.Accelerator = ShardingAccelerator
    commands, current = [], []
    for arg in argv:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    for command in commands + [current]:
        code = training.train.main(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
