"""The memory estimate ComfyUI gets for an AAADiT forward, against a forward measured on the CPU.

The estimate (``native_dit.forward_memory``) is what the native model's ``memory_required`` and
AAA Sampler hand to ComfyUI's memory manager: too low and a GPU runs out of memory, too high and
ComfyUI offloads models for nothing. The measurement counts the bytes of every tensor torch
allocates during one forward of a real-width DiT and keeps the peak of those alive at once. Two
blocks suffice: inference frees each block's activations before the next, so the peak does not
grow with depth. A few seconds.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pack_import import pack_module

native_dit = pack_module("nodes.native_dit")
dit = pack_module("aaa_core.dit")

TEXT_TOKENS = 128


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storage alive while it is active; ``peak`` is the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # data pointer -> [tensors seen on it, bytes]

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                entry = self.storages.setdefault(storage.data_ptr(), [0, storage.nbytes()])
                if entry[0] == 0:
                    self.live += entry[1]
                    self.peak = max(self.peak, self.live)
                entry[0] += 1
                weakref.finalize(tensor, self._release, storage.data_ptr())
        return out


@pytest.fixture(scope="module")
def real_width_dit():
    torch.manual_seed(0)
    return dit.AAADiT(dit.AAADiTConfig(depth=2)).eval()


@pytest.mark.parametrize("image_size", [256, 1024])
def test_forward_memory_estimate_covers_a_measured_forward_without_gross_excess(real_width_dit, image_size: int) -> None:
    side = image_size // 16
    latents, embeds = torch.randn(1, 128, side, side), torch.randn(1, TEXT_TOKENS, 1024)
    with torch.no_grad(), PeakTensorMemory() as memory:
        real_width_dit(latents, embeds, torch.tensor([500.0]))
    estimate = native_dit.forward_memory(real_width_dit.config, 1, side, side, TEXT_TOKENS, torch.float32)
    assert memory.peak > 4 * latents.nbytes  # the measurement saw the activations
    assert memory.peak <= estimate <= 2 * memory.peak, (image_size, memory.peak / 2**20, estimate / 2**20)
