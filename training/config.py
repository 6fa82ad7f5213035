"""Every training option with its default and help text, in one place; read from TOML and the command line.

Precedence: the defaults below, then the ``--config`` TOML file (flat ``key = value`` lines using
these field names), then command-line options (``--batch-size 8`` for ``batch_size``). Relative
paths are relative to the current directory. ``python -m training --help`` lists every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from aaa_core import defaults
from aaa_core.cli import OneLineParser
from aaa_core.devices import bf16_is_native
from aaa_core.dit import DEFAULT_PRESET, DIT_PRESETS
from aaa_core.errors import InputError
from aaa_core.geometry import DOWNSCALE
from aaa_core.input_files import not_a_file_message, not_utf8_message, special_file_kind
from aaa_core.limits import MAX_RESOLUTION, MAX_STEPS, SEED_MAX, check_text

from .buckets import parse_buckets

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser (pip install tomli)
    import tomli as tomllib


def option(default: Any, help: str, group: str, **argparse_kwargs: Any) -> Any:
    """A config field: its default, its ``--help`` text and its group there."""
    meta = {"help": help, "group": group, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


DATA, MODEL, OPTIM, RUN, SAVE, FEEDBACK = "data", "model", "optimisation", "run", "checkpoints", "feedback"
PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure")
LOADINGS = ("auto", "memory", "shards")  # how the loop reaches the encoded data (encoded_data.py)
WARMUPS = ("constant", "linear")  # the learning rate's warm-up shapes (lr_schedule.py)
DECAYS = ("constant", "cosine", "linear")  # and what it does after the warm-up
MAX_DATA_WORKERS = 64  # reader processes per training process; more only competes for the disk
NUMPY_SEED_MAX = 2**32 - 1  # the trainer seeds numpy too, which takes no larger seed
NOT_RECORDED = ("overwrite",)  # a one-time action: re-running a run's config.toml must not delete that run


@dataclasses.dataclass
class TrainConfig:
    """The whole recipe. Defaults: the reference recipe (section 10 of docs/diffsynth-aaa.md) with real batches."""

    # --- data -----------------------------------------------------------------------------
    data: str = option("", "training images: a folder with metadata.csv (columns image, prompt), a .csv file, "
                       "or a folder of images with same-named .txt captions", DATA)
    resolution: int = option(defaults.SIZE, "training size in pixels, a multiple of 16: the side of the square images (resize to cover, "
                             "then centre-crop), or with --buckets aspect the area R x R each shape keeps", DATA)
    buckets: str = option("square", "image shapes: 'square' (every image cropped to R x R), 'aspect' (shapes of about R x R "
                          "pixels from 1:2 to 2:1; each image goes to the one nearest its aspect ratio, so less is cropped) "
                          "or a list of WIDTHxHEIGHT sizes such as 512x256,256x512,384x384 (multiples of 16)", DATA)
    cache_dir: str = option("", "where encoded latents and prompt embeddings are kept (default: OUTPUT_DIR/cache); "
                            "share it between runs on the same data", DATA)
    encode_batch_size: int = option(8, "images or prompts per VAE / text-encoder call while filling the cache", DATA)
    encoder_dtype: str = option("auto", "dtype of the frozen VAE and text encoder and of the cache: auto (bf16 like the "
                                "reference on GPUs and on CPUs with native bf16, else fp32), bf16 or fp32", DATA, choices=["auto", "bf16", "fp32"])
    cache_on_device: bool = option(True, "with the data set in memory, keep it on the GPU when it takes at most a quarter "
                                   "of the free GPU memory (fast); off: in host memory", DATA)
    data_loading: str = option("auto", "how training reads the encoded data set: memory (all of it in memory, fastest), "
                               "shards (packed once into CACHE_DIR/packed, read by --data-workers: memory stays flat for "
                               "data sets of any size), auto (memory if it takes at most a quarter of the available "
                               "memory per process, else shards). Both give the same training", DATA, choices=list(LOADINGS))
    data_workers: int = option(2, "DataLoader worker processes per training process reading the shards (0: the "
                               "training process reads them itself)", DATA)

    # --- models ---------------------------------------------------------------------------
    init_from: str = option("", "AAADiT .safetensors to fine-tune (its sizes are read from the file; 'published' "
                            "fetches step-600000); empty: random init like the reference", MODEL, aliases=["--dit"])
    vae: str = option("", "FLUX.2 VAE .safetensors (default: download once from ModelScope into MODEL_DIR)", MODEL)
    text_encoder: str = option("", "Qwen3-0.6B model.safetensors or its folder (default: download once)", MODEL)
    model_dir: str = option("", "where downloaded model files are kept (default: $AAA_MODEL_DIR or ~/.cache/aaa_dit)", MODEL)
    model: str = option(DEFAULT_PRESET, "named DiT size for a random init: " + ", ".join(
                        f"{name} (dim {c.dim}, depth {c.depth}, {c.num_heads} heads)" for name, c in DIT_PRESETS.items())
                        + f"; {DEFAULT_PRESET} is the published model's; --dim, --depth and --num-heads override it",
                        MODEL, choices=list(DIT_PRESETS))
    dim: int = option(0, "DiT width (random init only; 0: the --model preset's)", MODEL)
    depth: int = option(0, "DiT blocks (random init only; 0: the --model preset's)", MODEL)
    num_heads: int = option(0, "attention heads; dim / num_heads is the head size (random init only; 0: the --model preset's)", MODEL)
    gradient_checkpointing: bool = option(False, "recompute block activations in the backward pass (less memory, ~30% slower)", MODEL)
    compile: bool = option(False, "torch.compile each DiT block (faster on GPU after a minute of compiling)", MODEL)
    lora_rank: int = option(0, "train a LoRA of this rank on the frozen --init-from checkpoint instead of all weights "
                            "(0 = full training); saves checkpoints/<run>-lora-step-N.safetensors for models/loras", MODEL)
    lora_alpha: float = option(0.0, "LoRA alpha; the update is scaled by alpha / rank (0: alpha = rank, scale 1)", MODEL)
    lora_targets: list = option(["to_q", "to_k", "to_v", "to_out", "ff.0", "ff.2"], "linear layers that get adapters: "
                                "the end of a module name (to_q: every block's) or a full name (blocks.0.to_q, proj_out)",
                                MODEL, nargs="+", metavar="LAYER")

    # --- optimisation ---------------------------------------------------------------------
    batch_size: int = option(32, "samples per step on each process (the reference: 1)", OPTIM)
    grad_accum: int = option(1, "micro-batches per optimizer step; global batch = batch_size x grad_accum x processes", OPTIM)
    lr: float = option(2e-4, "AdamW learning rate (reference)", OPTIM)
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (reference)", OPTIM)
    adam_beta1: float = option(0.9, "AdamW beta1 (PyTorch default, as the reference)", OPTIM)
    adam_beta2: float = option(0.999, "AdamW beta2 (PyTorch default, as the reference)", OPTIM)
    adam_eps: float = option(1e-8, "AdamW epsilon (PyTorch default, as the reference)", OPTIM)
    warmup: str = option("constant", "LR warm-up shape: 'constant' runs lr/3 for warmup_steps (the reference's ConstantLR), "
                         "'linear' ramps from lr/warmup_steps up to lr", OPTIM, choices=list(WARMUPS))
    warmup_steps: int = option(5, "optimizer steps of warm-up (reference: 5)", OPTIM)
    lr_schedule: str = option("constant", "learning rate after the warm-up: 'constant' (the reference), or 'cosine' / 'linear' "
                              "decay to min_lr at the last step (max_steps, or max_epochs converted to steps)", OPTIM,
                              choices=list(DECAYS))
    min_lr: float = option(0.0, "the learning rate the cosine and linear schedules end at", OPTIM)
    caption_dropout: float = option(0.0, "share of the samples that train on the negative prompt instead of their caption, "
                                    "so classifier-free guidance has an unconditional model to contrast with (0: none, as "
                                    "the reference; about 0.1 is usual for new models trained from scratch)", OPTIM)
    max_grad_norm: float = option(0.0, "clip the global gradient norm to this; 0 = off, as the reference", OPTIM)
    ema_decay: float = option(0.999, "EMA of the weights (used for samples and the saved .safetensors); 0 = off. "
                              "Warm-up: decay min(ema_decay, (1+t)/(10+t)) at step t", OPTIM)
    precision: str = option("auto", "auto (bf16 on GPU and on CPUs with native bf16, AVX512-BF16 or AMX; else fp32), "
                            "fp32, bf16 (autocast, fp32 master weights and optimizer), or bf16-pure (the reference: weights and AdamW states in bf16)", OPTIM, choices=list(PRECISIONS))
    reference_timesteps: bool = option(False, "round the timestep to bf16 before the sigma/weight lookup as the reference "
                                       "does (reaches only 384 of the 1000 grid sigmas); off = exact grid values", OPTIM)

    # --- run ------------------------------------------------------------------------------
    output_dir: str = option("runs/aaa", "run folder: checkpoints/, states/, samples/, tensorboard/, train.log", RUN)
    overwrite: bool = option(False, "start afresh in an OUTPUT_DIR that holds another run: deletes its states/, checkpoints/, "
                             "samples/, tensorboard/, train.log, config.toml and run.json (the encoding cache is kept); "
                             "without it such a run is refused. Not recorded in config.toml", RUN)
    seed: int = option(0, "seed for the init, the data order, the noise and the timesteps", RUN)
    max_steps: int = option(10000, "stop after this many optimizer steps (0 = no limit; then max_epochs must be set)", RUN)
    max_epochs: float = option(0.0, "stop after this many passes over the data (0 = no limit); the first limit reached wins", RUN)
    device: str = option("auto", "auto (what accelerate picks: the process's GPU, else CPU) or cpu", RUN, choices=["auto", "cpu"])

    # --- checkpoints ----------------------------------------------------------------------
    save_every: int = option(1000, "write a checkpoint and a training state every this many steps (0: only at the end and on Ctrl-C)", SAVE)
    save_dtype: str = option("bf16", "dtype of the ComfyUI-loadable checkpoint (bf16 like the published file, or fp32)", SAVE, choices=["bf16", "fp32"])
    keep_states: int = option(2, "full training states to keep (the newest ones); checkpoints are all kept", SAVE)
    resume: str = option("", "continue from the newest training state in OUTPUT_DIR/states ('--resume' alone), "
                         "or from the state folder given", SAVE, nargs="?", const="latest")

    # --- feedback -------------------------------------------------------------------------
    log_every: int = option(10, "log loss, lr, steps/s, images/s and MFU every this many steps", FEEDBACK)
    log_seconds: float = option(30.0, "also write a plain progress line (step, rate, ETA, loss) whenever nothing was "
                                "logged for this many seconds, and after the first step, whatever log_every says", FEEDBACK)
    tensorboard: bool = option(True, "write TensorBoard logs to OUTPUT_DIR/tensorboard", FEEDBACK)
    validation_split: float = option(0.0, "hold out this share (below 1) or number (1 or more) of the training images, chosen "
                                     "by file name so every run holds out the same ones, to compute the validation loss on "
                                     "(0: none)", FEEDBACK)
    validation_data: str = option("", "held-out images for the validation loss, in any --data layout (instead of "
                                  "--validation-split; a training image with the same content is left out of training)", FEEDBACK)
    validate_every: int = option(500, "compute the validation loss every this many steps and at the end (0 = never): the "
                                 "mean flow-matching loss at 8 fixed timesteps with fixed noise, for the raw and EMA weights", FEEDBACK)
    sample_every: int = option(500, "render the validation prompts every this many steps and at the end (0 = never)", FEEDBACK)
    validation_prompts: list = option([], "prompts rendered in the sample grids (default: the first num_validation_prompts captions)",
                                      FEEDBACK, nargs="*", metavar="PROMPT")
    num_validation_prompts: int = option(4, "captions used when validation_prompts is empty", FEEDBACK)
    negative_prompt: str = option(defaults.NEGATIVE_PROMPT, "negative prompt of the samples (the reference samples with ' ')", FEEDBACK)
    sample_steps: int = option(defaults.STEPS, f"Euler steps per sample (reference: {defaults.STEPS})", FEEDBACK)
    sample_cfg: float = option(defaults.CFG, f"classifier-free guidance of the samples (reference: {defaults.CFG:g})", FEEDBACK)
    sample_seed: int = option(0, "noise seed of the first sample; prompt i uses seed + i", FEEDBACK)
    peak_flops: float = option(0.0, "accelerator peak bf16 FLOP/s for MFU (default: looked up from the GPU name)", FEEDBACK)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # NaN passes every range check below, and inf most
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{field.name} {value}: must be a finite number")
        self._apply_model_preset()
        checks = [
            (self.data != "", "no training data: pass --data FOLDER_OR_CSV (or set data in the --config file)"),
            (self.resolution >= DOWNSCALE and self.resolution % DOWNSCALE == 0, f"resolution {self.resolution} is not a positive multiple of {DOWNSCALE}"),
            (self.resolution <= MAX_RESOLUTION, f"resolution {self.resolution} is above the maximum of {MAX_RESOLUTION}"),
            (0 <= self.seed <= NUMPY_SEED_MAX, f"seed {self.seed} must be between 0 and {NUMPY_SEED_MAX} (numpy's seed range)"),
            (0 <= self.sample_seed <= SEED_MAX, f"sample_seed {self.sample_seed} must be between 0 and {SEED_MAX}"),
            (self.sample_steps <= MAX_STEPS, f"sample_steps {self.sample_steps} is above the maximum of {MAX_STEPS}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
            (self.max_steps > 0 or self.max_epochs > 0, "set max_steps or max_epochs (both are 0, so training would never stop)"),
            (self.max_steps >= 0 and self.max_epochs >= 0, "max_steps and max_epochs must not be negative"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay {self.ema_decay} must be in [0, 1)"),
            (self.keep_states >= 1, "keep_states must be at least 1"),
            (not (self.overwrite and self.resume), "--overwrite deletes the states --resume would continue from: pass one of them"),
            (self.encoder_dtype in ("auto", "bf16", "fp32"), f"encoder_dtype {self.encoder_dtype!r}: use auto, bf16 or fp32"),
            (self.precision in PRECISIONS, f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"),
            (self.lora_rank >= 0 and self.lora_alpha >= 0, "lora_rank and lora_alpha must not be negative"),
            (not self.lora_rank or self.init_from != "", "--lora-rank trains adapters on a base model: pass --init-from published or FILE"),
            (not self.lora_rank or self.lora_targets != [], "--lora-rank needs at least one layer in --lora-targets"),
            (self.dim % self.num_heads == 0, f"dim {self.dim} is not divisible by num_heads {self.num_heads} "
             f"(--model {self.model} gives the sizes not set explicitly)"),
            (self.lr >= 0, f"lr {self.lr} must not be negative (0 freezes the weights)"),
            (self.warmup in WARMUPS and self.lr_schedule in DECAYS,
             f"warmup {self.warmup!r} / lr_schedule {self.lr_schedule!r}: use {' or '.join(WARMUPS)} / {', '.join(DECAYS)}"),
            (self.validation_split >= 0 and (self.validation_split < 1 or self.validation_split.is_integer()),
             f"validation_split {self.validation_split:g}: use a share below 1 or a whole number of images"),
            (not (self.validation_split and self.validation_data), "pass --validation-split or --validation-data, not both"),
            (0 <= self.caption_dropout <= 1, f"caption_dropout {self.caption_dropout} must be between 0 and 1"),
            (0 <= self.min_lr <= self.lr, f"min_lr {self.min_lr} must be between 0 and lr {self.lr}"),
            (self.adam_eps > 0, f"adam_eps {self.adam_eps} must be greater than 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam_beta1 {self.adam_beta1} and adam_beta2 {self.adam_beta2} must be in [0, 1)"),
            (min(self.weight_decay, self.max_grad_norm, self.peak_flops) >= 0,
             "weight_decay, max_grad_norm and peak_flops must not be negative"),
            (self.log_seconds > 0, f"log_seconds {self.log_seconds} must be greater than 0"),
            (min(self.log_every, self.encode_batch_size, self.sample_steps) >= 1, "log_every, encode_batch_size and sample_steps must be at least 1"),
            (self.data_loading in LOADINGS, f"data_loading {self.data_loading!r}: use one of {', '.join(LOADINGS)}"),
            (0 <= self.data_workers <= MAX_DATA_WORKERS, f"data_workers {self.data_workers} must be between 0 and {MAX_DATA_WORKERS}"),
            (min(self.save_every, self.sample_every, self.validate_every, self.warmup_steps) >= 0,
             "save_every, sample_every, validate_every and warmup_steps must not be negative"),
            (self.sample_every == 0 or self.validation_prompts or self.num_validation_prompts >= 1,
             f"num_validation_prompts {self.num_validation_prompts} must be at least 1 when samples are drawn (or set sample_every 0)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        parse_buckets(self.buckets, self.resolution)  # a bad list fails now, not after the data is encoded
        check_text("negative_prompt", self.negative_prompt)  # the prompts the samples render, as the CLI checks its own
        for index, prompt in enumerate(self.validation_prompts):
            check_text(f"validation_prompts[{index}]", prompt)

    def _apply_model_preset(self) -> None:
        """Fills the sizes left at 0 from the ``model`` preset: explicit dim/depth/num_heads win.

        The resolved sizes are what ``config.toml`` records, so re-running it builds the same model.
        """
        if self.model not in DIT_PRESETS:
            raise InputError(f"model {self.model!r}: unknown size; use one of {', '.join(DIT_PRESETS)}")
        if min(self.dim, self.depth, self.num_heads) < 0:
            raise InputError(f"dim {self.dim}, depth {self.depth}, num_heads {self.num_heads}: sizes must not be negative")
        preset = DIT_PRESETS[self.model]
        self.dim = self.dim or preset.dim
        self.depth = self.depth or preset.depth
        self.num_heads = self.num_heads or preset.num_heads

    def resolved_precision(self, use_cuda: bool) -> str:
        """``precision`` with auto made concrete: bf16 autocast on GPUs and on CPUs that compute bf16 natively."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if bf16_is_native("cuda" if use_cuda else "cpu") else "fp32"

    @property
    def global_batch_per_process(self) -> int:
        return self.batch_size * self.grad_accum

    def to_toml(self) -> str:
        """The resolved config as a TOML file that ``--config`` reads back."""
        lines = [f"# Resolved config of this run; re-run with: python -m training --config {Path(self.output_dir) / 'config.toml'}"]
        for field in dataclasses.fields(self):
            if field.name in NOT_RECORDED:
                continue
            value = getattr(self, field.name)
            lines.append(f"{field.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # JSON strings are valid TOML basic strings


# --------------------------------------------------------------------------------------
# Command line and TOML
# --------------------------------------------------------------------------------------

FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m training",
        description="Train AAADiT from scratch or fine-tune it. Options come from the defaults, then --config, "
        "then the command line. Multi-GPU: accelerate launch --multi_gpu --num_processes N -m training ...",
    )
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below (field names with underscores)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in FIELDS.items():
        meta = field.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = dict(meta["argparse"])
        flags = [f"--{name.replace('_', '-')}", *kwargs.pop("aliases", [])]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = meta["help"]
        if "(default" not in help_text and default not in ("", []):
            help_text += f" (default: {default!r})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kwargs.update(dest=name, default=argparse.SUPPRESS, help=help_text)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif not isinstance(default, list):
            kwargs.setdefault("type", type(default))
        group.add_argument(*flags, **kwargs)
    return parser


def read_toml(path: Path) -> dict[str, Any]:
    """Reads a flat TOML config, checking names and types so a typo fails with the key's name."""
    kind = special_file_kind(path)
    if kind is not None:
        raise InputError(not_a_file_message(path, kind, "a TOML file"))
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a TOML file") from None
    except OSError as err:
        raise InputError(f"{path}: config file cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise InputError(not_utf8_message(path, err, "a UTF-8 TOML file")) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise InputError(f"{path}: unknown option '{key}' (see python -m training --help)")
        values[name] = _check_type(name, value, path)
    return values


def _check_type(name: str, value: Any, path: Path) -> Any:
    field = FIELDS[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, expected) and (expected is bool) == isinstance(value, bool):
        return value
    raise InputError(f"{path}: '{name}' must be {expected.__name__}, got {value!r}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then the command line."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values = read_toml(config_file) if config_file else {}
    values.update(args)
    return TrainConfig(**values)
