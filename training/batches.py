"""The data order: which samples form micro-batch ``m`` on process ``r``, as a pure function of the seed.

Every micro-batch holds samples of one aspect-ratio bucket (the same one on every process), so
its latents stack. Each bucket's samples form an endless stream: its epoch ``e`` is a permutation
of them seeded by ``(seed, bucket, e)``, and epochs follow each other without gaps. Time is cut
into rounds: round ``k`` holds ``ceil(n_b / G)`` micro-batches of each non-empty bucket ``b``
(``G = batch_size x processes``), in an order shuffled by ``(seed, k)``, so each bucket is visited
in proportion to its size. The ``j``-th micro-batch of bucket ``b`` takes the next ``G`` positions
of ``b``'s stream and process ``r`` its ``r``-th slice. Nothing is dropped at epoch ends and a
bucket smaller than a batch still works. Because the order depends only on ``(seed, m)``,
resuming at step ``k`` needs nothing but ``k``.

With a single bucket (square training) this is exactly the order of the trainer before buckets:
one stream of permutations seeded by ``seed * 1_000_003 + e``, micro-batch ``m`` at positions
``[m * G, (m + 1) * G)``, so runs resumed across that change stay bit-exact.
"""

from __future__ import annotations

import math

import torch

_BUCKET_SEED_STRIDE = 1 << 40  # bucket b's epoch seeds start here: no epoch count reaches the next bucket's
_ROUND_SEED_OFFSET = 1 << 63  # round seeds lie above every epoch seed (torch takes seeds below 2**64)


class BatchOrder:
    """Sample indices and the bucket of each micro-batch; permutations and round orders are made on demand and kept briefly."""

    def __init__(self, bucket_ids: torch.Tensor, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device):
        """``bucket_ids[i]``: the bucket of sample ``i`` (integers from 0; buckets without samples are skipped)."""
        if bucket_ids.ndim != 1 or len(bucket_ids) == 0 or bucket_ids.is_floating_point() or bucket_ids.min() < 0:
            raise ValueError(f"bucket_ids must be a non-empty 1-D tensor of bucket numbers >= 0, got {bucket_ids}")
        ids = bucket_ids.to("cpu", torch.long)
        self.num_samples = len(ids)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        group = batch_size * world_size
        by_bucket = torch.argsort(ids, stable=True).split(torch.bincount(ids).tolist())  # global sample numbers, ascending
        self._members = {b: members for b, members in enumerate(by_bucket) if len(members)}
        self._per_round = {b: math.ceil(len(members) / group) for b, members in self._members.items()}
        self.round_length = sum(self._per_round.values())  # micro-batches per round
        self._epochs: dict[tuple[int, int], torch.Tensor] = {}
        self._rounds: dict[int, tuple[list[int], list[int]]] = {}

    def permutation(self, bucket: int, epoch: int) -> torch.Tensor:
        """Bucket ``bucket``'s samples (global numbers) in the order of its epoch ``epoch``, on the device."""
        key = (bucket, epoch)
        if key not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + bucket * _BUCKET_SEED_STRIDE)
            self._epochs = {(b, e): p for (b, e), p in self._epochs.items() if b != bucket or e >= epoch - 1}  # two per bucket
            members = self._members[bucket]
            permutation = members[torch.randperm(len(members), generator=generator)]  # on the CPU: the same order on any device
            if self.device.type == "cuda":  # pinned + non_blocking: no GPU sync at every epoch boundary
                permutation = permutation.pin_memory()
            self._epochs[key] = permutation.to(self.device, non_blocking=True)
        return self._epochs[key]

    def bucket(self, micro_step: int) -> int:
        """The bucket all samples of micro-batch ``micro_step`` come from, on every process."""
        return self._locate(micro_step)[0]

    def indices(self, micro_step: int) -> torch.Tensor:
        """``(batch_size,)`` sample indices of this process's share of micro-batch ``micro_step``."""
        bucket, nth = self._locate(micro_step)
        size = len(self._members[bucket])
        start = (nth * self.world_size + self.rank) * self.batch_size
        parts, position, end = [], start, start + self.batch_size
        while position < end:
            epoch, offset = divmod(position, size)
            take = min(end - position, size - offset)
            parts.append(self.permutation(bucket, epoch)[offset : offset + take])
            position += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def epoch(self, micro_steps_done: int) -> float:
        """Passes over the data completed after ``micro_steps_done`` micro-batches (all processes)."""
        return micro_steps_done * self.batch_size * self.world_size / self.num_samples

    def _locate(self, micro_step: int) -> tuple[int, int]:
        """(bucket, how many micro-batches of that bucket came before this one)."""
        round_, position = divmod(micro_step, self.round_length)
        buckets, earlier = self._round(round_)
        bucket = buckets[position]
        return bucket, round_ * self._per_round[bucket] + earlier[position]

    def _round(self, round_: int) -> tuple[list[int], list[int]]:
        """Round ``round_``'s bucket of each micro-batch, and how many of that bucket precede it in the round."""
        if round_ not in self._rounds:
            buckets = [b for b, count in self._per_round.items() for _ in range(count)]
            if len(self._per_round) > 1:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_ + _ROUND_SEED_OFFSET)
                buckets = [buckets[i] for i in torch.randperm(len(buckets), generator=generator).tolist()]
            seen: dict[int, int] = dict.fromkeys(self._per_round, 0)
            earlier = []
            for bucket in buckets:
                earlier.append(seen[bucket])
                seen[bucket] += 1
            self._rounds = {r: v for r, v in self._rounds.items() if r >= round_ - 1}  # keep at most two
            self._rounds[round_] = (buckets, earlier)
        return self._rounds[round_]
