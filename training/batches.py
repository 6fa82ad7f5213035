"""The data order: which samples form micro-batch ``m`` on process ``r``, as a pure function of the seed.

The samples form an endless stream: epoch ``e`` is a permutation of all samples seeded by
``(seed, e)``, and epochs follow each other without gaps. Micro-batch ``m`` takes the next
``batch_size x processes`` stream positions and process ``r`` its ``r``-th slice. Nothing is
dropped at epoch ends and a data set smaller than a batch still works. Because the order
depends only on ``(seed, m)``, resuming at step ``k`` needs nothing but ``k``.
"""

from __future__ import annotations

import torch


class BatchOrder:
    """Sample indices for each micro-batch; epoch permutations are computed on demand and kept briefly."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self._epochs: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs = {e: p for e, p in self._epochs.items() if e >= epoch - 1}  # keep at most two
            permutation = torch.randperm(self.num_samples, generator=generator)  # on the CPU: the same order on any device
            if self.device.type == "cuda":  # pinned + non_blocking: no GPU sync at every epoch boundary
                permutation = permutation.pin_memory()
            self._epochs[epoch] = permutation.to(self.device, non_blocking=True)
        return self._epochs[epoch]

    def indices(self, micro_step: int) -> torch.Tensor:
        """``(batch_size,)`` sample indices of this process's share of micro-batch ``micro_step``."""
        start = (micro_step * self.world_size + self.rank) * self.batch_size
        parts, position, end = [], start, start + self.batch_size
        while position < end:
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            parts.append(self.permutation(epoch)[offset : offset + take])
            position += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def epoch(self, micro_steps_done: int) -> float:
        """Passes over the data completed after ``micro_steps_done`` micro-batches (all processes)."""
        return micro_steps_done * self.batch_size * self.world_size / self.num_samples
