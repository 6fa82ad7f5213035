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
Start afresh in a folder that holds another run (deletes the files that run wrote; one trainer per folder at a time):
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
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from aaa_core import downloads
from aaa_core.outputs import write_text_atomic
from aaa_core.dit import AAADiT, AAADiTConfig, load_dit
from aaa_core.errors import AAAError, InputError, ways_out
from aaa_core.geometry import LATENT_CHANNELS, image_tokens
from aaa_core.scheduler import TrainingSchedule

from .batches import BatchOrder
from .buckets import Bucket, parse_buckets
from .caption_dropout import CaptionDropout
from .cache import CacheStats, EncodingCache, cache_dir_for, encoder_dtype_for
from .checkpoints import RunSaver, load_state, read_progress, state_model_config, warn_on_changes
from .config import TrainConfig, parse_config
from .distributed import check_setup, processes_of, shard_like
from .encoded_data import InMemoryData, Loading, TrainingData, load_training_data, plan_data
from .interrupt import StopRequest
from .lora import LoraRun, check_state_kind
from .lr_schedule import LrSchedule
from .progress import Heartbeat
from .validation import Validation, hold_out, run_validation, without_held_out_images
from .loss import draw_noise, flow_matching_loss, step_generator
from .memory import check_model_fits
from .metrics import LogWindow, TensorBoard, log_to_file, peak_flops, stop_logging_to_file, training_flops_per_sample
from .pairs import Sample, Skipped, find_samples, report_skipped
from .processes import Processes
from .run_folder import check_output_dir, claim_output_dir, run_to_continue
from .run_lock import lock_output_dir
from .sample_grids import SampleGrids

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
    accelerator, device, precision = _accelerator(cfg)
    compute_dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    encoder_dtype = encoder_dtype_for(cfg.encoder_dtype, device)
    if not (cfg.resume or cfg.init_from):  # the sizes are the options' (else a file's, which was trained at that size)
        _check_memory(cfg, accelerator, compute_dtype, device)

    out = Path(cfg.output_dir).expanduser()
    stop = StopRequest().install()  # first Ctrl-C / SIGTERM: finish the step, save, exit
    processes = processes_of(accelerator, stop)
    lock = log_file = None
    try:
        # The data, the model files and the output folder are checked before that folder is created or written.
        samples, skipped = find_samples(cfg.data)
        samples, held_out, skipped_held_out = hold_out(samples, cfg.validation_split, cfg.validation_data)
        skipped += skipped_held_out
        vae_path, text_encoder_path, init_path = _model_files(cfg, accelerator)
        check_output_dir(out)
        # No other trainer in this folder until the run ends; then which state to continue and which run owns it.
        lock = lock_output_dir(out, processes)
        state, resumed_run = run_to_continue(out, cfg.resume)
        run_id = claim_output_dir(out, resumed_run, cfg.overwrite, processes)
        log_file = log_to_file(out / "train.log", processes.is_main)
        log.info("run %s: %d process(es) on %s, precision %s, encoders in %s", out, processes.world_size, device, precision,
                 encoder_dtype)

        # ------------------------------------------------------------ data
        with accelerator.main_process_first():  # one model-file hash, then the others reuse it
            cache = EncodingCache(cache_dir_for(out, cfg.cache_dir), vae_path, text_encoder_path, cfg.resolution, encoder_dtype)
        prompts = cfg.validation_prompts or list(dict.fromkeys(s.caption for s in samples))[: cfg.num_validation_prompts]
        buckets = parse_buckets(cfg.buckets, cfg.resolution)
        data, held_out_data, skipped = _load_data(cfg, samples, held_out, skipped, prompts, cache, buckets, vae_path,
                                                  text_encoder_path, device, processes)
        text_tokens, text_dim = data.text_shape
        log.info("data: %d samples (%s), prompts %dx%d, %s", len(data), data.bucket_counts(), text_tokens, text_dim, data.describe())

        # ------------------------------------------------------------ model
        if cfg.resume and state is None:
            log.info("--resume: no saved state in %s yet; starting from the beginning", out / "states")
        model, cfg = _build_model(cfg, state, init_path, text_dim)
        if processes.is_main:  # what runs, now that the sizes are decided
            write_text_atomic(out / "config.toml", cfg.to_toml())
        _check_encoders_fit(model.config, text_dim)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.to(device=device, dtype=compute_dtype)
        log.info("AAADiT %s: %.1fM parameters", model.config, sum(p.numel() for p in model.parameters()) / 1e6)
        lora = LoraRun(model, init_path, cache.model_sha256(init_path), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                       bool(cfg.sample_every)) if cfg.lora_rank else None
        trained = lora.adapters if lora else model  # what the optimizer, the EMA and the states hold

        # ------------------------------------------------------------ EMA
        # A float32 copy on the device, updated after every optimizer step; it is what the saved
        # .safetensors and the samples use. The raw weights stay in the training state.
        ema = copy.deepcopy(trained).float().eval().requires_grad_(False) if cfg.ema_decay > 0 else None

        # ------------------------------------------------------------ optimizer
        samples_per_step = cfg.batch_size * cfg.grad_accum * processes.world_size
        total_steps = _total_steps(cfg, len(data), samples_per_step)
        optimizer, lr_scheduler = _optimizer(cfg, trained, total_steps, fused=device.type == "cuda")
        if cfg.compile:
            for block in model.blocks:
                block.compile()
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
        trained = lora.adapters if lora else unwrapped
        ema = shard_like(ema, trained)  # under FSDP each process averages its own slices

        # ------------------------------------------------------------ resume
        step = 0 if state is None else _resume(state, cfg, trained, ema, optimizer, lr_scheduler, lora, data.fingerprint, processes)

        # ------------------------------------------------------------ loop
        schedule = _schedule_on(device)
        order = BatchOrder(data.bucket_ids, cfg.batch_size, processes.rank, processes.world_size, cfg.seed, data.bucket_ids.device)
        validation = held_out_data is not None and Validation(held_out_data, cfg.batch_size, processes, schedule,
                                                              cfg.reference_timesteps, compute_dtype, device)
        drop_captions = CaptionDropout(cfg.caption_dropout, data.extra_prompts.get(cfg.negative_prompt), cfg.seed, processes.rank)
        batches = data.batches(order, step * cfg.grad_accum, total_steps * cfg.grad_accum)  # this process's share, in order
        flops_per_step, peak = _flops_per_step(cfg, unwrapped, text_tokens, lora is not None), peak_flops(device, cfg.peak_flops)
        tensorboard = TensorBoard(out / "tensorboard", cfg.tensorboard and processes.is_main)
        sample_grids = SampleGrids(cfg, out, prompts, data.extra_prompts, buckets, vae_path, encoder_dtype, device,
                                   accelerator.autocast, lora, tensorboard, processes)
        saver = RunSaver(out, run_id, cfg, trained, ema, optimizer, lr_scheduler, unwrapped.config, lora, data.fingerprint, processes)
        if state is not None:
            saver.resumed_at(step)

        log.info("training steps %d -> %d: %d samples per step (%d x %d accumulation x %d processes), %.1f epochs",
                 step, total_steps, samples_per_step, cfg.batch_size, cfg.grad_accum, processes.world_size,
                 total_steps * samples_per_step / len(data))
        validation_losses: list[tuple[int, dict[str, float]]] = []
        stopped = False
        window = LogWindow(Heartbeat(cfg.log_seconds, step, total_steps), tensorboard, accelerator.reduce, device, samples_per_step,
                           flops_per_step, peak, processes.is_main)
        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=None if processes.is_main else True,
                   dynamic_ncols=True)
        with bar, logging_redirect_tqdm(), contextlib.closing(batches):  # closing ends the data workers
            while step < total_steps:
                for micro in range(cfg.grad_accum):
                    latents, text, indices, noise = _micro_batch(next(batches), step * cfg.grad_accum + micro, cfg.seed,
                                                                 processes.rank, device, compute_dtype, drop_captions, schedule)
                    no_sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with no_sync:
                        loss = flow_matching_loss(model, latents, text, indices, noise, schedule, cfg.reference_timesteps).mean()
                        accelerator.backward(loss / cfg.grad_accum)
                    window.add_loss(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, trained, min(cfg.ema_decay, (1 + step) / (10 + step)))
                step += 1
                window.stepped()
                bar.update(1)
                stopping = processes.agree_to_stop(may_sync=step % cfg.log_every == 0)

                if _due(step, cfg.log_every, total_steps) or stopping:
                    window.log(step, total_steps, lr_scheduler.get_last_lr()[0], order.epoch(step * cfg.grad_accum), grad_norm, bar)
                else:
                    window.heartbeat_if_due(step)
                if cfg.sample_every and _due(step, cfg.sample_every, total_steps) and not stopping:
                    sample_grids(step, ema if ema is not None else trained, unwrapped.config)
                    window.restart()
                if validation and _due(step, cfg.validate_every, total_steps) and not stopping:
                    validation_losses.append((step, run_validation(validation, step, model, trained, ema, accelerator.reduce)))
                    tensorboard.scalars(validation_losses[-1][1], step)
                    window.restart()
                if _due(step, cfg.save_every, total_steps) or stopping:
                    saver.save(step)
                    window.restart()
                if stopping:
                    stopped = True
                    _log_stopped(step, processes.is_main)
                    break

        # ------------------------------------------------------------ final checkpoint
        if saver.saved_step != step:
            saver.save(step)
        tensorboard.close()
        if processes.is_main and saver.saved_checkpoint is not None:
            _log_done(saver.saved_checkpoint, lora is not None)
        accelerator.end_training()
        return TrainSummary(step, saver.saved_checkpoint, saver.saved_state, window.losses, data.stats, skipped, stopped,
                            validation_losses)
    finally:
        stop.restore()
        stop_logging_to_file(log_file)
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * weights``, on every parameter at once."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def _accelerator(cfg: TrainConfig) -> tuple[Accelerator, torch.device, str]:
    """accelerate's set-up of this process, its device and the precision the run computes in."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    precision = cfg.resolved_precision(use_cuda)
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if precision == "bf16" else "no")
    device = accelerator.device
    if device.type == "cpu":
        device = torch.device("cpu")  # several CPU processes get "cpu:0", which safetensors does not accept
    check_setup(accelerator, lora=bool(cfg.lora_rank))
    if use_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls that remain
    return accelerator, device, precision


def _check_memory(cfg: TrainConfig, accelerator: Accelerator, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Refuses a model of the options' sizes that cannot fit, before any file is read or written."""
    sizes = AAADiTConfig(cfg.dim, cfg.depth, cfg.num_heads, latent_channels=LATENT_CHANNELS, text_dim=1)  # a lower bound
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    check_model_fits(sizes, compute_dtype, cfg.ema_decay > 0, device, accelerator.num_processes if fsdp else 1)


def _model_files(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Path, Path, Path | None]:
    """The VAE, the text encoder and the DiT to start from (None: random weights), downloaded where missing."""
    with accelerator.main_process_first():  # one download, then the others reuse it
        wanted = {"vae": cfg.vae or None, "text_encoder": cfg.text_encoder or None}
        if cfg.init_from:
            wanted["dit"] = None if cfg.init_from == "published" else cfg.init_from
        files = downloads.resolve_model_files(wanted, cfg.model_dir or None)  # every missing file in one error
    return files["vae"], files["text_encoder"], files.get("dit")


def _load_data(cfg: TrainConfig, samples: list[Sample], held_out: list[Sample], skipped: list[Skipped], prompts: list[str],
               cache: EncodingCache, buckets: list[Bucket], vae_path: Path, text_encoder_path: Path, device: torch.device,
               processes: Processes) -> tuple[TrainingData, InMemoryData | None, list[Skipped]]:
    """The training set and the held-out set (None without validation), encoded where the cache lacks them, and
    every image left out (``skipped`` and the unreadable ones), reported."""
    # The sample prompts are cached too (sampling never loads Qwen3), and the negative one for caption dropout.
    extra_prompts = (prompts if cfg.sample_every else []) + ([cfg.negative_prompt] if cfg.sample_every or cfg.caption_dropout else [])
    plan = plan_data(samples, extra_prompts, cache, buckets, processes)
    held_out_plan = plan_data(held_out, [], cache, buckets, processes) if held_out and cfg.validate_every else None
    plan = without_held_out_images(plan, held_out_plan) if held_out_plan else plan
    loading = Loading(cfg.data_loading, device, cfg.cache_on_device, cfg.data_workers, cfg.encode_batch_size, processes)
    data, unreadable = load_training_data(plan, cache, vae_path, text_encoder_path, loading)
    held_out_data = None
    if held_out_plan:  # small: always held in memory
        held_out_data, unreadable_held_out = load_training_data(held_out_plan, cache, vae_path, text_encoder_path,
                                                                dataclasses.replace(loading, mode="memory"))
        unreadable += unreadable_held_out
    if processes.is_main:
        report_skipped(skipped + unreadable, len(samples) + len(held_out) + len(skipped))
    return data, held_out_data, skipped + unreadable


def _build_model(cfg: TrainConfig, state: Path | None, init_path: Path | None, text_dim: int) -> tuple[AAADiT, TrainConfig]:
    """The DiT to train (the same initial weights on every process) and the options with its sizes."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if state is not None and not cfg.lora_rank:  # sizes from the state; the weights are loaded after accelerate's set-up
        model = AAADiT(state_model_config(state))
        return model, cfg.with_sizes_of(model.config, state)
    if cfg.init_from:
        model = load_dit(init_path, dtype=torch.float32).train().requires_grad_(True)
        log.info("fine-tuning %s (sizes from the file: %s)", init_path, model.config)
        return model, cfg.with_sizes_of(model.config, init_path)
    return AAADiT(AAADiTConfig(cfg.dim, cfg.depth, cfg.num_heads, latent_channels=LATENT_CHANNELS, text_dim=text_dim)), cfg


def _check_encoders_fit(config: AAADiTConfig, text_dim: int) -> None:
    if (config.latent_channels, config.text_dim) != (LATENT_CHANNELS, text_dim):
        raise InputError(
            f"the DiT takes {config.latent_channels}-channel latents and {config.text_dim}-wide prompts, "
            f"but the encoders give {LATENT_CHANNELS} and {text_dim}"
        )


def _optimizer(cfg: TrainConfig, trained: torch.nn.Module, total_steps: int, fused: bool,
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the trained weights and its learning-rate schedule."""
    optimizer = torch.optim.AdamW(
        trained.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, fused=fused,
    )
    lr_schedule = LrSchedule(cfg.lr, cfg.warmup, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr, total_steps)
    log.info("%s", lr_schedule.describe())
    # Stepped once per optimizer step by us (not passed to accelerate, which would step it once per process).
    # A lambda, which the scheduler's state leaves out: the rate comes from the step alone.
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_schedule.factor(step))


def _resume(state: Path, cfg: TrainConfig, trained: torch.nn.Module, ema: torch.nn.Module | None,
            optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler, lora: LoraRun | None,
            data_fingerprint: str, processes: Processes) -> int:
    """Loads ``state`` into the built objects; returns its step."""
    check_state_kind(read_progress(state), state, lora.settings if lora else None)
    progress = load_state(state, trained, ema, optimizer, lr_scheduler, processes.rank)
    warn_on_changes(progress, cfg, data_fingerprint, processes.world_size, state)
    log.info("resumed from %s at step %d", state, progress["step"])
    return progress["step"]


def _schedule_on(device: torch.device) -> TrainingSchedule:
    """The training timestep schedule, its tables on the device once: indexing a CPU table every step would copy it
    over and sync the GPU."""
    schedule = TrainingSchedule.flux2()
    return dataclasses.replace(schedule, sigmas=schedule.sigmas.to(device), weights=schedule.weights.to(device))


def _micro_batch(batch: tuple[torch.Tensor, torch.Tensor], micro_step: int, seed: int, rank: int, device: torch.device,
                 dtype: torch.dtype, drop_captions: CaptionDropout, schedule: TrainingSchedule,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, prompts (some dropped), timestep indices and noise of one micro-step, on the device."""
    latents, text = batch
    latents = latents.to(device, dtype, non_blocking=True)
    text = drop_captions(text.to(device, non_blocking=True), micro_step)
    indices, noise = draw_noise(latents, len(schedule.sigmas), step_generator(seed, micro_step, rank, device))
    return latents, text, indices, noise


def _flops_per_step(cfg: TrainConfig, model: AAADiT, text_tokens: int, frozen: bool) -> float:
    """Training FLOPs of one optimizer step on one process (for MFU)."""
    # Every bucket holds about as many image tokens as the square one.
    tokens = image_tokens(cfg.resolution, cfg.resolution), text_tokens
    return training_flops_per_sample(model, *tokens, frozen=frozen) * cfg.batch_size * cfg.grad_accum


def _due(step: int, every: int, last: int) -> bool:
    """At every ``every``-th step (none when 0) and at the last one."""
    return step == last or (every > 0 and step % every == 0)


def _log_done(checkpoint: Path, is_lora: bool) -> None:
    where = "loras/ and apply it with LoraLoaderModelOnly" if is_lora else "diffusion_models/ and pick it in the AAADiT loader"
    log.info("done: %s (copy it to ComfyUI/models/%s)", checkpoint, where)


def _log_stopped(step: int, is_main: bool) -> None:
    log.warning("stopped at step %d; continue with --resume", step)
    if is_main and "TORCHELASTIC_RUN_ID" in os.environ:  # started by accelerate launch / torchrun
        log.warning("the state is complete; if the launcher itself was signalled, it now prints a "
                    "SignalException traceback and exits 1: that is torchrun reporting the signal")


def _total_steps(cfg: TrainConfig, num_samples: int, samples_per_step: int) -> int:
    """The first of max_steps and max_epochs reached."""
    limits = []
    if cfg.max_steps > 0:
        limits.append(cfg.max_steps)
    if cfg.max_epochs > 0:
        limits.append(max(1, math.ceil(cfg.max_epochs * num_samples / samples_per_step)))
    return min(limits)


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
