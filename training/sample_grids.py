"""Validation images: fixed prompts and seeds rendered during training, so a user sees the model learn.

Sampling is ``aaa_core.sampling.sample`` (the reference's Euler sampler with CFG, section 8 of
docs/diffsynth-aaa.md) followed by a VAE decode; prompt ``i`` always uses noise seed ``seed + i``,
and the wide and tall images of a bucketed run show prompt 0 with seed ``seed``.
The prompt embeddings come from the cache, so the text encoder is never loaded for this.
``SampleGrids`` is the trainer's sample step: one grid every ``--sample-every`` steps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image

from aaa_core.dit import AAADiTConfig
from aaa_core.errors import ComputeError
from aaa_core.outputs import atomic_output
from aaa_core.pipeline import decode_latents
from aaa_core.sampling import make_noise, sample
from aaa_core.images import tensor_to_pil
from aaa_core.vae import Flux2VAE, load_vae

from .buckets import Bucket, wide_and_tall
from .distributed import sampling_model
from .metrics import TensorBoard
from .processes import Processes
from .progress import Progress

if TYPE_CHECKING:  # lora.py imports this module (side_by_side)
    from .lora import LoraRun

log = logging.getLogger(__name__)


@torch.no_grad()
def render_grid(
    model: torch.nn.Module,
    vae: Flux2VAE,
    prompts: torch.Tensor,
    negative: torch.Tensor,
    resolution: int,
    steps: int,
    cfg: float,
    seed: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    should_stop: Callable[[], bool] = lambda: False,
    extra_sizes: Sequence[tuple[int, int]] = (),
) -> Image.Image | None:
    """Renders one square image per prompt embedding ``(P, L, D)`` and tiles them.

    ``extra_sizes`` ((width, height) pixels, e.g. the widest and tallest bucket) add the first
    prompt at each size, with its seed, in a row under the grid: one prompt compared across shapes.
    None if stopped midway, or if the numbers overflowed (a warning says why): a bad sample
    grid is no reason to end the run, and a black grid is no reason to save one.
    """
    device = next(model.parameters()).device
    dtype = torch.float32 if next(model.parameters()).dtype == torch.float32 else torch.bfloat16
    factor = vae.downscale_factor
    side = resolution // factor
    batches = [(make_noise(seed, len(prompts), side, side, dtype, device), prompts)]
    batches += [(make_noise(seed, 1, height // factor, width // factor, dtype, device), prompts[:1]) for width, height in extra_sizes]

    def stop_check(done: int, total: int, x0: torch.Tensor) -> None:
        bar.update()
        if should_stop():
            raise _Stopped

    was_training = model.training
    model.eval()
    stack = contextlib.ExitStack()
    try:
        rendered = []
        bar = stack.enter_context(Progress(len(batches) * steps, "sample grid", "steps"))
        for noise, embeds in batches:
            with autocast():
                latents = sample(model, noise, embeds.to(device), negative[None].to(device), steps, cfg, callback=stop_check)
            rendered.append(tensor_to_pil(decode_latents(vae, latents)))
    except _Stopped:
        return None
    except ComputeError as err:
        log.warning("no sample grid this time: %s", err)
        return None
    finally:
        stack.close()
        model.train(was_training)
    grid = tile(rendered[0])
    return with_row_below(grid, [images[0] for images in rendered[1:]]) if extra_sizes else grid


class SampleGrids:
    """The trainer's sample step: the grid of the fixed prompts, saved as samples/step-NNNNNN.png and to TensorBoard.

    The main process renders; under FSDP every process first helps gather the weights. The VAE
    decoder is loaded at the first grid.
    """

    def __init__(self, cfg: Any, out: Path, prompts: list[str], prompt_embeds: dict[str, torch.Tensor], buckets: list[Bucket],
                 vae_path: Path, vae_dtype: torch.dtype, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                 lora: LoraRun | None, tensorboard: TensorBoard, processes: Processes):
        self.cfg, self.out, self.vae_path, self.vae_dtype, self.device, self.autocast = cfg, out, vae_path, vae_dtype, device, autocast
        self.lora, self.tensorboard, self.processes, self.vae = lora, tensorboard, processes, None
        if processes.is_main and cfg.sample_every:
            self.prompts = torch.stack([prompt_embeds[p] for p in prompts])
            self.negative = prompt_embeds[cfg.negative_prompt]
            self.extra_sizes = wide_and_tall(buckets)  # one prompt at the widest and the tallest bucket too
            write_prompt_list(out / "samples" / "prompts.txt", prompts, cfg.sample_seed, lora is not None, self.extra_sizes)

    def __call__(self, step: int, weights: torch.nn.Module, config: AAADiTConfig) -> None:
        """Renders and saves the grid of ``step`` with ``weights`` (call on every process)."""
        is_main, cfg = self.processes.is_main, self.cfg
        sampled = sampling_model(weights, config, keep=is_main)
        if is_main:
            if self.vae is None:
                self.vae = load_vae(self.vae_path, dtype=self.vae_dtype, device=self.device)
            render = functools.partial(
                render_grid, vae=self.vae, prompts=self.prompts, negative=self.negative, resolution=cfg.resolution,
                steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.sample_seed, extra_sizes=self.extra_sizes,
                autocast=self.autocast, should_stop=self.processes.stop_requested)
            grid = self.lora.sample_grid(render, sampled) if self.lora else render(sampled)
            if grid is not None:
                with atomic_output(self.out / "samples" / f"step-{step:06d}.png") as tmp:
                    grid.save(tmp, format="PNG")
                self.tensorboard.image("samples", grid, step)
        self.processes.barrier()


class _Stopped(Exception):
    """Raised from the sampler's callback when the user asked to stop."""


def tile(images: list[Image.Image]) -> Image.Image:
    """A near-square grid, row by row, in prompt order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def with_row_below(grid: Image.Image, images: list[Image.Image]) -> Image.Image:
    """``images`` left to right under ``grid``, each at its own size, on white."""
    width = max(grid.width, sum(image.width for image in images))
    both = Image.new("RGB", (width, grid.height + max(image.height for image in images)), (255, 255, 255))
    both.paste(grid, (0, 0))
    left = 0
    for image in images:
        both.paste(image, (left, grid.height))
        left += image.width
    return both


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two grids of the same size next to each other, with a white gap between them."""
    gap = max(2, left.width // 64)
    both = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    both.paste(left, (0, 0))
    both.paste(right, (left.width + gap, 0))
    return both


def write_prompt_list(
    path: Path, prompts: list[str], seed: int, beside_base: bool = False, extra_sizes: Sequence[tuple[int, int]] = (),
) -> None:
    """``samples/prompts.txt``: which prompt and seed each grid cell shows (and, for a LoRA, which half is which).

    The images of ``extra_sizes`` (the row under the grid) show the first prompt with its seed.
    """
    lines = ["left grid: the base model; right grid: the base with the LoRA (same cells)"] if beside_base else []
    lines += [f"cell {i} (seed {seed + i}): {prompt}" for i, prompt in enumerate(prompts)]
    lines += [f"{_shape_name(w, h)} {w}x{h} (seed {seed}): {prompts[0]}" for w, h in extra_sizes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _shape_name(width: int, height: int) -> str:
    return "wide" if width > height else "tall" if height > width else "square"
