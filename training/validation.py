"""Held-out validation: the flow-matching loss on images never trained on, at fixed timesteps with fixed noise.

The training loss of a diffusion model swings with the random timestep and noise of each batch,
so its curve says little about progress. Here every held-out image is evaluated at the same
``VALIDATION_TIMESTEPS`` grid positions, spread evenly over the training grid (training draws
the grid index uniformly, ``docs/diffsynth-aaa.md`` section 2.5), each with noise seeded by the
image's place in the held-out set alone. Two evaluations, two runs and a resumed run therefore
measure the same thing, and equal weights give equal numbers. The loss is the training loss
(``loss.py``: weighted MSE on the velocity), reported per group of neighbouring timesteps and
overall, for the raw weights and for the EMA.

The held-out images are chosen from the file names (a hash, so the choice does not change
between runs or when images are added), or come from their own folder. They are planned and
encoded into the same cache as the training images, and a training image with the same content
as a held-out one is left out of training too.

With several processes each evaluates a share and the sums are reduced; every process runs the
same number of forward passes (an empty share repeats a sample with weight 0), as FSDP requires.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from typing import Callable, Iterator

import numpy as np
import torch

from aaa_core.errors import InputError
from aaa_core.scheduler import TrainingSchedule

from .encoded_data import DataPlan, InMemoryData
from .pairs import Sample, Skipped, find_samples
from .distributed import reshard_after_forward
from .loss import flow_matching_loss
from .processes import Processes
from .progress import Progress

log = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = 8  # grid positions per held-out image
TIMESTEP_GROUPS = 4  # reported separately: from high noise to low
NOISE_SEED = 20240519  # fixed, so runs with different --seed are compared on the same noise


# --------------------------------------------------------------------------------------
# Which images are held out
# --------------------------------------------------------------------------------------


def hold_out(samples: list[Sample], split: float, folder: str) -> tuple[list[Sample], list[Sample], list[Skipped]]:
    """(training samples, held-out samples, pairs skipped in ``folder``): ``split`` is a share below 1 or a count."""
    if folder:
        held_out, skipped = find_samples(folder)
        return samples, held_out, skipped
    count = round(split * len(samples)) if split < 1 else int(split)
    if count == 0:
        return samples, [], []
    if count >= len(samples):
        raise InputError(f"validation_split {split:g} holds out {count} of the {len(samples)} images: none would be left to train on")
    by_name = sorted(samples, key=lambda s: (hashlib.sha256(s.image.name.encode()).digest(), str(s.image)))
    chosen = {id(s) for s in by_name[:count]}
    return [s for s in samples if id(s) not in chosen], [s for s in samples if id(s) in chosen], []


def without_held_out_images(plan: DataPlan, held_out: DataPlan) -> DataPlan:
    """``plan`` less the samples whose image (content and size) is also held out."""
    held = set(held_out.latent_keys)
    keep = [i for i, key in enumerate(plan.latent_keys) if key not in held]
    if len(keep) == len(plan.latent_keys):
        return plan
    if not keep:
        raise InputError("every training image is also in the validation data; nothing is left to train on")
    log.info("data: %d training image(s) left out because the validation data holds the same image",
             len(plan.latent_keys) - len(keep))
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return dataclasses.replace(plan, samples=pick(plan.samples), bucket_of=pick(plan.bucket_of),
                               latent_keys=pick(plan.latent_keys), text_keys=pick(plan.text_keys))


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    latents: torch.Tensor
    text: torch.Tensor
    ids: list[int]  # place of each sample in the held-out set: seeds its noise
    weight: torch.Tensor  # 1, or 0 for the stand-in of an empty share


class Validation:
    """This process's share of the held-out set, evaluated by ``evaluate`` every ``--validate-every`` steps."""

    def __init__(self, data: InMemoryData, batch_size: int, processes: Processes, schedule: TrainingSchedule,
                 reference_timesteps: bool, compute_dtype: torch.dtype, device: torch.device):
        self.num_samples, self.is_main = len(data), processes.is_main
        self.schedule, self.reference_timesteps = schedule, reference_timesteps
        self.compute_dtype, self.device = compute_dtype, device
        grid = len(schedule.sigmas)
        self.indices = [int((2 * k + 1) * grid // (2 * VALIDATION_TIMESTEPS)) for k in range(VALIDATION_TIMESTEPS)]
        timesteps = schedule.timesteps.cpu()[self.indices].tolist()
        size = VALIDATION_TIMESTEPS // TIMESTEP_GROUPS
        self.groups = [(f"t{round(timesteps[g * size])}-{round(timesteps[g * size + size - 1])}", slice(g * size, g * size + size))
                       for g in range(TIMESTEP_GROUPS)]
        self.batches = list(_shares(data, batch_size, processes.rank, processes.world_size))

    def _noise(self, batch: _Batch) -> torch.Tensor:
        shape = batch.latents.shape[1:]
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(_seed(i))) for i in batch.ids]  # CPU: any device agrees
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def losses(self, model: torch.nn.Module, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Mean loss over the whole held-out set at each of the fixed timesteps, ``(VALIDATION_TIMESTEPS,)``."""
        sums = torch.zeros(VALIDATION_TIMESTEPS + 1, device=self.device)  # the last entry counts the samples
        with Progress(len(self.batches) * len(self.indices), "validation", "forward passes", enabled=self.is_main) as bar:
            for batch in self.batches:
                self._add_losses(model, batch, sums, bar)
        reshard_after_forward(model)
        sums = reduce_sum(sums)
        return sums[:-1] / sums[-1]

    def _add_losses(self, model: torch.nn.Module, batch: _Batch, sums: torch.Tensor, bar: Progress) -> None:
        """Adds the batch's weighted losses at each timestep to ``sums[:-1]`` and its sample count to ``sums[-1]``."""
        latents = batch.latents.to(self.device, self.compute_dtype)
        text, weight, noise = batch.text.to(self.device), batch.weight.to(self.device), self._noise(batch)
        for k, index in enumerate(self.indices):
            indices = torch.full((len(latents),), index, device=self.device)
            loss = flow_matching_loss(model, latents, text, indices, noise, self.schedule, self.reference_timesteps)
            sums[k] += (loss * weight).sum()
            bar.update()
        sums[-1] += weight.sum()

    def evaluate(self, model: torch.nn.Module, trained: torch.nn.Module, ema: torch.nn.Module | None,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """TensorBoard scalars ``val/raw/loss``, ``val/raw/t1000-840``, ... and the same for ``val/ema``.

        ``model`` is what training calls (wrapped by DDP or FSDP), ``trained`` the parameters it
        trains; the EMA is evaluated by copying it into those parameters for the while.
        """
        scalars: dict[str, float] = {}
        for kind, weights in (("raw", None), ("ema", ema)):
            if kind == "ema" and ema is None:
                continue
            with _weights_of(trained, weights):
                losses = self.losses(model, reduce_sum).tolist()
            scalars[f"val/{kind}/loss"] = sum(losses) / len(losses)
            scalars.update({f"val/{kind}/{name}": float(np.mean(losses[part])) for name, part in self.groups})
        return scalars

    def report(self, scalars: dict[str, float], step: int, seconds: float) -> str:
        """The log line of one evaluation."""
        parts = []
        for kind in ("ema", "raw"):
            if f"val/{kind}/loss" in scalars:
                groups = ", ".join(f"{name} {scalars[f'val/{kind}/{name}']:.4f}" for name, _ in self.groups)
                parts.append(f"{kind} {scalars[f'val/{kind}/loss']:.4f} ({groups})")
        return f"step {step} | validation loss on {self.num_samples} held-out images | {' | '.join(parts)} | {seconds:.1f} s"


def run_validation(validation: Validation, step: int, model: torch.nn.Module, trained: torch.nn.Module,
                   ema: torch.nn.Module | None, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Evaluates, logs the line and returns the scalars."""
    start = time.perf_counter()
    log.info("step %d: validating on %d held-out images", step, validation.num_samples)
    scalars = validation.evaluate(model, trained, ema, reduce_sum)
    log.info("%s", validation.report(scalars, step, time.perf_counter() - start))
    return scalars


@contextlib.contextmanager
def _weights_of(trained: torch.nn.Module, weights: torch.nn.Module | None) -> Iterator[None]:
    """``trained`` holds a copy of ``weights``' values inside the block (nothing changes for None), then its own again."""
    if weights is None:
        yield
        return
    params = list(trained.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, value in zip(params, weights.parameters()):
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)


def _shares(data: InMemoryData, batch_size: int, rank: int, world_size: int) -> Iterator[_Batch]:
    """This process's batches: each bucket's samples in groups of batch_size x processes, this process's slice of each."""
    bucket_ids = data.bucket_ids.cpu()
    for bucket in range(len(data.buckets)):
        members = torch.nonzero(bucket_ids == bucket).flatten().tolist()
        group = batch_size * world_size
        for start in range(0, len(members), group):
            chunk = members[start : start + group]
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
            weight = torch.ones(len(mine))
            if not mine:  # a forward pass anyway: under FSDP every process must take part in each one
                mine, weight = chunk[:1], torch.zeros(1)
            rows = torch.tensor(mine)
            yield _Batch(data.latents[bucket][data.image_index[rows]], data.text[data.text_index[rows]], mine, weight)


def _seed(sample: int) -> int:
    state = np.random.SeedSequence([NOISE_SEED, sample]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])
