"""Trains AAADiT on FLUX.2 latents and Qwen3 prompt embeddings, encoded once into a cache.

One GPU (or the CPU):
    python -m training --config training/configs/pokemon.toml
Several GPUs on one machine (accelerate/DDP does the distribution; nothing else changes; --device cpu
runs the processes on the CPU; a second launch on the same machine needs its own --main_process_port):
    accelerate launch --multi_gpu --num_processes 8 -m training --config training/configs/pokemon.toml
Several machines (on each machine with its own --machine_rank; OUTPUT_DIR and any --cache-dir on a shared disk):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m training --config training/configs/pokemon.toml
The large presets sharded with FSDP2 (weights, gradients, AdamW and EMA split across the GPUs; the
checkpoints and states stay full files, so they resume under DDP too; LoRA runs are refused: use DDP):
    accelerate launch --config_file training/configs/fsdp.yaml --num_processes 8 -m training --config ... --model AAA-XL
Continue after Ctrl-C, a crash or a time limit (Ctrl-C and SIGTERM save first):
    python -m training --config training/configs/pokemon.toml --resume
Stop a launched run: signal the training processes, ``pkill -TERM -P LAUNCHER_PID``; they save and
the launcher exits 0. Ctrl-C or SIGTERM on the launcher saves too, but torchrun then reports its own
signal as a failure (SignalException traceback, exit 1), and it kills processes still saving after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30; raise it for large states or slow disks).
Start afresh in a folder that holds another run (deletes its states and checkpoints):
    python -m training --config training/configs/pokemon.toml --overwrite
Mixed image shapes and a data set larger than memory (aspect buckets; shards read by DataLoader workers):
    python -m training --config training/configs/pokemon.toml --buckets aspect --data-loading shards
Fine-tune the published step-600000 instead of starting from random weights:
    python -m training --config training/configs/pokemon.toml --init-from published --lr 2e-5
Train a LoRA on it instead (base frozen; a few-MB file for ComfyUI's models/loras):
    python -m training --config training/configs/pokemon.toml --init-from published --lora-rank 16 --lr 1e-4

``train(config)`` reads top to bottom: set-up, data, model, EMA, optimizer, resume, loop,
final checkpoint. Every option and its default is in ``config.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from aaa_core import downloads
from aaa_core.outputs import atomic_output, write_text_atomic
from aaa_core.dit import AAADiT, AAADiTConfig, load_dit
from aaa_core.errors import AAAError, InputError, ways_out
from aaa_core.geometry import LATENT_CHANNELS, image_tokens
from aaa_core.scheduler import TrainingSchedule
from aaa_core.vae import load_vae

from .batches import BatchOrder
from .buckets import parse_buckets, wide_and_tall
from .caption_dropout import CaptionDropout
from .cache import CacheStats, EncodingCache, cache_dir_for, encoder_dtype_for
from .checkpoints import (
    SAVE_DTYPES, find_state, load_state, read_progress, save_state, save_weights, state_model_config, warn_on_changes,
)
from .config import TrainConfig, parse_config
from .distributed import check_setup, full_state_dict, sampling_model, shard_like
from .encoded_data import Loading, load_training_data, plan_data
from .interrupt import StopRequest
from .lora import LoraRun, check_state_kind
from .lr_schedule import LrSchedule
from .progress import Heartbeat
from .validation import Validation, hold_out, run_validation, without_held_out_images
from .loss import draw_noise, flow_matching_loss, step_generator
from .metrics import TensorBoard, log_to_file, peak_flops, stop_logging_to_file, training_flops_per_sample
from .pairs import Skipped, find_samples, report_skipped
from .run_folder import claim_output_dir, folder_run_id
from .sample_grids import render_grid, write_prompt_list

log = logging.getLogger("training")
# The option that passes each model file (downloads.SOURCES keys), for the way out of a missing or bad download.
MODEL_OPTIONS = {"dit": "--init-from", "vae": "--vae", "text_encoder": "--text-encoder"}

@dataclasses.dataclass
class TrainSummary:
    """What a run did, for callers and tests."""

    step: int
    checkpoint: Path | None
    state: Path | None
    losses: list[tuple[int, float]]  # (step, mean loss since the previous log line)
    cache: CacheStats
    skipped: list[Skipped]
    stopped: bool
    validation: list[tuple[int, dict[str, float]]]  # (step, TensorBoard's val/... scalars)


def train(cfg: TrainConfig) -> TrainSummary:
    # ---------------------------------------------------------------- set-up
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    precision = cfg.resolved_precision(use_cuda)
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if precision == "bf16" else "no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if device.type == "cpu":
        device = torch.device("cpu")  # several CPU processes get "cpu:0", which safetensors does not accept
    is_main, barrier = accelerator.is_main_process, accelerator.wait_for_everyone  # global main: OUTPUT_DIR is shared
    check_setup(accelerator, lora=bool(cfg.lora_rank))
    compute_dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    encoder_dtype = encoder_dtype_for(cfg.encoder_dtype, device)
    if use_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls that remain

    out = Path(cfg.output_dir).expanduser()
    # Which state to continue and which run owns the folder, before anything is written into it.
    state = find_state(cfg.resume, out / "states", folder_run_id(out)) if cfg.resume else None
    run_id = claim_output_dir(out, read_progress(state)["run_id"] if state else None, cfg.overwrite, is_main, barrier)
    log_file = log_to_file(out / "train.log", is_main)
    if is_main:
        write_text_atomic(out / "config.toml", cfg.to_toml())
    log.info("run %s: %d process(es) on %s, precision %s, encoders in %s", out, world, device, precision, encoder_dtype)

    stop = StopRequest().install()  # first Ctrl-C / SIGTERM: finish the step, save, exit
    try:
        # ------------------------------------------------------------ data
        samples, skipped = find_samples(cfg.data)
        samples, held_out, skipped_held_out = hold_out(samples, cfg.validation_split, cfg.validation_data)
        skipped += skipped_held_out
        with accelerator.main_process_first():  # one download and one model-file hash, then the others reuse them
            wanted = {"vae": cfg.vae or None, "text_encoder": cfg.text_encoder or None}
            if cfg.init_from:
                wanted["dit"] = None if cfg.init_from == "published" else cfg.init_from
            files = downloads.resolve_model_files(wanted, cfg.model_dir or None)  # every missing file in one error
            vae_path, text_encoder_path, init_path = files["vae"], files["text_encoder"], files.get("dit")
            cache = EncodingCache(cache_dir_for(out, cfg.cache_dir), vae_path, text_encoder_path, cfg.resolution, encoder_dtype)
        prompts = cfg.validation_prompts or list(dict.fromkeys(s.caption for s in samples))[: cfg.num_validation_prompts]
        buckets = parse_buckets(cfg.buckets, cfg.resolution)
        # The sample prompts are cached too (sampling never loads Qwen3), and the negative one for caption dropout.
        extra_prompts = (prompts if cfg.sample_every else []) + ([cfg.negative_prompt] if cfg.sample_every or cfg.caption_dropout else [])
        plan = plan_data(samples, extra_prompts, cache, buckets, is_main, barrier)
        held_out_plan = plan_data(held_out, [], cache, buckets, is_main, barrier) if held_out and cfg.validate_every else None
        plan = without_held_out_images(plan, held_out_plan) if held_out_plan else plan
        loading = Loading(cfg.data_loading, device, cfg.cache_on_device, cfg.data_workers, cfg.encode_batch_size,
                          rank, world, barrier, stop)
        data, unreadable = load_training_data(plan, cache, vae_path, text_encoder_path, loading)
        if held_out_plan:  # small: always held in memory
            held_out_data, unreadable_held_out = load_training_data(held_out_plan, cache, vae_path, text_encoder_path,
                                                                    dataclasses.replace(loading, mode="memory"))
            unreadable += unreadable_held_out
        skipped += unreadable
        if is_main:
            report_skipped(skipped, len(samples) + len(held_out) + len(skipped) - len(unreadable))
        text_tokens, text_dim = data.text_shape
        log.info("data: %d samples (%s), prompts %dx%d, %s", len(data), data.bucket_counts(), text_tokens, text_dim, data.describe())

        # ------------------------------------------------------------ model
        if cfg.resume and state is None:
            log.info("--resume: no saved state in %s yet; starting from the beginning", out / "states")
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if state is not None and not cfg.lora_rank:  # sizes from the state; the weights are loaded below
            model = AAADiT(state_model_config(state))
        elif cfg.init_from:
            model = load_dit(init_path, dtype=torch.float32).train().requires_grad_(True)
            log.info("fine-tuning %s (sizes from the file: %s)", init_path, model.config)
        else:
            model = AAADiT(AAADiTConfig(cfg.dim, cfg.depth, cfg.num_heads, latent_channels=LATENT_CHANNELS, text_dim=text_dim))
        if (model.config.latent_channels, model.config.text_dim) != (LATENT_CHANNELS, text_dim):
            raise InputError(
                f"the DiT takes {model.config.latent_channels}-channel latents and {model.config.text_dim}-wide prompts, "
                f"but the encoders give {LATENT_CHANNELS} and {text_dim}"
            )
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.to(device=device, dtype=compute_dtype)
        num_params = sum(p.numel() for p in model.parameters())
        log.info("AAADiT %s: %.1fM parameters", model.config, num_params / 1e6)
        lora = LoraRun(model, init_path, cache.model_sha256(init_path), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                       bool(cfg.sample_every)) if cfg.lora_rank else None
        trained = lora.adapters if lora else model  # what the optimizer, the EMA and the states hold

        # ------------------------------------------------------------ EMA
        # A float32 copy on the device, updated after every optimizer step; it is what the saved
        # .safetensors and the samples use. The raw weights stay in the training state.
        ema = copy.deepcopy(trained).float().eval().requires_grad_(False) if cfg.ema_decay > 0 else None

        # ------------------------------------------------------------ optimizer
        optimizer = torch.optim.AdamW(
            trained.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, fused=use_cuda,
        )

        samples_per_step = cfg.batch_size * cfg.grad_accum * world
        total_steps = _total_steps(cfg, len(data), samples_per_step)
        lr_schedule = LrSchedule(cfg.lr, cfg.warmup, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr, total_steps)
        log.info("%s", lr_schedule.describe())
        # Stepped once per optimizer step by us (not passed to accelerate, which would step it once per process).
        # A lambda, which the scheduler's state leaves out: the rate comes from the step alone.
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_schedule.factor(step))
        if cfg.compile:
            for block in model.blocks:
                block.compile()
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
        trained = lora.adapters if lora else unwrapped
        ema = shard_like(ema, trained)  # under FSDP each process averages its own slices

        # ------------------------------------------------------------ resume
        step = 0
        if state is not None:
            check_state_kind(read_progress(state), state, lora.settings if lora else None)
            progress = load_state(state, trained, ema, optimizer, lr_scheduler, rank)
            step = progress["step"]
            warn_on_changes(progress, cfg, data.fingerprint, world, state)
            log.info("resumed from %s at step %d", state, step)

        # ------------------------------------------------------------ loop
        schedule = TrainingSchedule.flux2()
        # On the device once: indexing a CPU table every step would copy it over and sync the GPU.
        schedule = dataclasses.replace(schedule, sigmas=schedule.sigmas.to(device), weights=schedule.weights.to(device))
        order = BatchOrder(data.bucket_ids, cfg.batch_size, rank, world, cfg.seed, data.bucket_ids.device)
        validation = held_out_plan and Validation(held_out_data, cfg.batch_size, rank, world, schedule,
                                                  cfg.reference_timesteps, compute_dtype, device)
        drop_captions = CaptionDropout(cfg.caption_dropout, data.extra_prompts.get(cfg.negative_prompt), cfg.seed, rank)
        batches = data.batches(order, step * cfg.grad_accum, total_steps * cfg.grad_accum)  # this process's share, in order
        # Every bucket holds about as many image tokens as the square one.
        flops_per_sample = training_flops_per_sample(unwrapped, image_tokens(cfg.resolution, cfg.resolution), text_tokens, frozen=lora is not None)
        flops_per_step = flops_per_sample * cfg.batch_size * cfg.grad_accum
        peak = peak_flops(device, cfg.peak_flops)
        run_name = out.resolve().name
        tensorboard = TensorBoard(out / "tensorboard", cfg.tensorboard and is_main)
        vae = None  # decoder for the samples, loaded at the first sample grid
        if is_main and cfg.sample_every:
            prompt_embeds = torch.stack([data.extra_prompts[p] for p in prompts])
            extra_sizes = wide_and_tall(buckets)  # one prompt at the widest and the tallest bucket too
            write_prompt_list(out / "samples" / "prompts.txt", prompts, cfg.sample_seed, lora is not None, extra_sizes)

        def save(step: int) -> tuple[Path | None, Path]:
            log.info("step %d: saving the weights and the training state", step)
            checkpoint = None
            weights, kind = (ema, "ema") if ema is not None else (trained, "raw")
            full_weights = full_state_dict(weights, keep=is_main)  # gathered from every process under FSDP
            if is_main and lora:
                checkpoint = out / "checkpoints" / f"{run_name}-lora-step-{step:06d}.safetensors"
                lora.save(weights, checkpoint, step, kind, SAVE_DTYPES[cfg.save_dtype], run_id)
            elif is_main:
                checkpoint = out / "checkpoints" / f"{run_name}-step-{step:06d}.safetensors"
                save_weights(full_weights, checkpoint, unwrapped.config, step, kind, SAVE_DTYPES[cfg.save_dtype], run_id)
            progress = {
                "run_id": run_id, "step": step, "model_config": unwrapped.config.to_json(), "config": dataclasses.asdict(cfg),
                "data_fingerprint": data.fingerprint, "world_size": world, "lora": lora.settings if lora else None,
            }
            state_dir = save_state(out / "states", step, trained, ema, optimizer, lr_scheduler, progress,
                                   cfg.keep_states, rank, barrier)
            log.info("step %d: saved %s and %s", step, checkpoint or "weights", state_dir)
            return checkpoint, state_dir

        log.info("training steps %d -> %d: %d samples per step (%d x %d accumulation x %d processes), %.1f epochs",
                 step, total_steps, samples_per_step, cfg.batch_size, cfg.grad_accum, world,
                 total_steps * samples_per_step / len(data))
        losses: list[tuple[int, float]] = []
        validation_losses: list[tuple[int, dict[str, float]]] = []
        checkpoint = state_dir = None
        last_saved = step if state is not None else -1
        loss_sum, loss_count = torch.zeros((), device=device), 0
        window_start, window_steps = time.perf_counter(), 0
        stopped = False
        heartbeat = Heartbeat(cfg.log_seconds, step, total_steps)
        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=None if is_main else True, dynamic_ncols=True)
        with bar, logging_redirect_tqdm(), contextlib.closing(batches):  # closing ends the data workers
            while step < total_steps:
                for micro in range(cfg.grad_accum):
                    micro_step = step * cfg.grad_accum + micro
                    latents, text = next(batches)
                    latents = latents.to(device, compute_dtype, non_blocking=True)
                    text = drop_captions(text.to(device, non_blocking=True), micro_step)
                    indices, noise = draw_noise(latents, len(schedule.sigmas), step_generator(cfg.seed, micro_step, rank, device))
                    no_sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with no_sync:
                        loss = flow_matching_loss(model, latents, text, indices, noise, schedule, cfg.reference_timesteps).mean()
                        accelerator.backward(loss / cfg.grad_accum)
                    loss_sum += loss.detach()
                    loss_count += 1
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, trained, min(cfg.ema_decay, (1 + step) / (10 + step)))
                step += 1
                window_steps += 1
                bar.update(1)
                # One process alone checks its flag every step; several agree at log steps (a collective syncs the GPU).
                stopping = stop.requested if world == 1 else step % cfg.log_every == 0 and _any_process(accelerator, stop.requested)

                if step % cfg.log_every == 0 or step == total_steps or stopping:
                    mean_loss = accelerator.reduce(loss_sum / loss_count, "mean").item()  # also syncs the GPU for timing
                    steps_per_s = window_steps / (time.perf_counter() - window_start)
                    scalars = {
                        "train/loss": mean_loss, "train/lr": lr_scheduler.get_last_lr()[0],
                        "train/epoch": order.epoch(step * cfg.grad_accum),
                        "perf/steps_per_s": steps_per_s, "perf/images_per_s": steps_per_s * samples_per_step,
                    }
                    if grad_norm is not None:
                        scalars["train/grad_norm"] = float(grad_norm)
                    if peak:
                        scalars["perf/mfu"] = flops_per_step * steps_per_s / peak
                    tensorboard.scalars(scalars, step)
                    losses.append((step, mean_loss))
                    mfu = f" | MFU {100 * scalars['perf/mfu']:.1f}%" if peak else ""
                    log.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.2f steps/s | %.1f img/s%s", step, total_steps,
                             scalars["train/epoch"], mean_loss, scalars["train/lr"], steps_per_s, scalars["perf/images_per_s"], mfu)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", steps_s=f"{steps_per_s:.2f}")
                    loss_sum.zero_()
                    loss_count = 0
                    window_start, window_steps = time.perf_counter(), 0
                    heartbeat.logged()
                elif is_main and heartbeat.due():  # a long step or a large log_every: never silent for long
                    log.info("%s", heartbeat.line(step, (loss_sum / loss_count).item()))

                if cfg.sample_every and (step % cfg.sample_every == 0 or step == total_steps) and not stopping:
                    sampled = sampling_model(ema if ema is not None else trained, unwrapped.config, keep=is_main)
                    if is_main:
                        if vae is None:
                            vae = load_vae(vae_path, dtype=encoder_dtype, device=device)
                        render = functools.partial(
                            render_grid, vae=vae, prompts=prompt_embeds, negative=data.extra_prompts[cfg.negative_prompt],
                            resolution=cfg.resolution, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.sample_seed,
                            extra_sizes=extra_sizes,
                            autocast=accelerator.autocast, should_stop=stop)
                        grid = lora.sample_grid(render, sampled) if lora else render(sampled)
                        if grid is not None:
                            with atomic_output(out / "samples" / f"step-{step:06d}.png") as tmp:
                                grid.save(tmp, format="PNG")
                            tensorboard.image("samples", grid, step)
                    barrier()
                    window_start, window_steps = time.perf_counter(), 0

                if validation and (step % cfg.validate_every == 0 or step == total_steps) and not stopping:
                    validation_losses.append((step, run_validation(validation, step, model, trained, ema, accelerator.reduce)))
                    tensorboard.scalars(validation_losses[-1][1], step)
                    window_start, window_steps = time.perf_counter(), 0

                if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or stopping:
                    checkpoint, state_dir = save(step)
                    last_saved = step
                    window_start, window_steps = time.perf_counter(), 0
                if stopping:
                    stopped = True
                    log.warning("stopped at step %d; continue with --resume", step)
                    if is_main and "TORCHELASTIC_RUN_ID" in os.environ:  # started by accelerate launch / torchrun
                        log.warning("the state is complete; if the launcher itself was signalled, it now prints a "
                                    "SignalException traceback and exits 1: that is torchrun reporting the signal")
                    break

        # ------------------------------------------------------------ final checkpoint
        if last_saved != step:
            checkpoint, state_dir = save(step)
        tensorboard.close()
        if is_main and checkpoint is not None:
            where = "loras/ and apply it with LoraLoaderModelOnly" if lora else "diffusion_models/ and pick it in the AAADiT loader"
            log.info("done: %s (copy it to ComfyUI/models/%s)", checkpoint, where)
        accelerator.end_training()
        return TrainSummary(step, checkpoint, state_dir, losses, data.stats, skipped, stopped, validation_losses)
    finally:
        stop.restore()
        stop_logging_to_file(log_file)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * weights``, on every parameter at once."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def _total_steps(cfg: TrainConfig, num_samples: int, samples_per_step: int) -> int:
    """The first of max_steps and max_epochs reached."""
    limits = []
    if cfg.max_steps > 0:
        limits.append(cfg.max_steps)
    if cfg.max_epochs > 0:
        limits.append(max(1, math.ceil(cfg.max_epochs * num_samples / samples_per_step)))
    return min(limits)


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True if any process was asked to stop, so all stop at the same step (no collective left waiting)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parses options, trains, and turns user errors into one line and exit code 1."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s")
    try:
        train(parse_config(argv))
    except AAAError as err:
        log.error("%s%s", err, ways_out(err, MODEL_OPTIONS))
        return 1
    except KeyboardInterrupt as stop:
        log.error("%s", stop if str(stop) else "interrupted without saving; the newest saved state is in OUTPUT_DIR/states")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
