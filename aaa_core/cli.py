"""The headless command line: ``python -m aaa_core generate --prompt ... --output out.png``.

Errors caused by input (bad sizes, missing or wrong model files, unwritable outputs) print one
line that names the flag or file and exit 1; every cheap check runs before any model is loaded.
No partial image is ever left behind: a batch is written to temp files and renamed only when
every image is complete, and temps left by a killed run are swept from the output folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from . import defaults
from .devices import resolve_device, resolve_dtype
from .errors import AAAError, InputError, ways_out
from .guards import out_of_memory_as_error
from .images import open_rgb
from .limits import MAX_BATCH_SIZE, MAX_RESOLUTION, MAX_STEPS
from .outputs import atomic_outputs, check_writable, sweep_temp_files

log = logging.getLogger("aaa_core")

# The flag that sets each GenerationSettings field, so that its errors name what to change.
SETTING_FLAGS = {
    "prompt": "--prompt", "negative_prompt": "--negative-prompt", "steps": "--steps", "cfg": "--cfg",
    "seed": "--seed", "width": "--width", "height": "--height", "batch_size": "--batch-size", "denoise": "--denoise",
}
# The flag that passes each model file (downloads.SOURCES keys), for the way out of a missing or bad download.
MODEL_FLAGS = {"dit": "--dit", "vae": "--vae", "text_encoder": "--text-encoder"}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes (``--width abc``, a missing ``--prompt``) print one line, like every other
    error, instead of the whole usage text; the exit status stays argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class DefaultsWhereTheySaySomething(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where X tells the reader something: not for ``None`` or a
    blank string, and not where the help text already explains the default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or str(action.default).strip() == "" or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m aaa_core", description="AAADiT text-to-image, headless.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt", formatter_class=DefaultsWhereTheySaySomething)
    gen.add_argument("--prompt", required=True, help="what to draw")
    gen.add_argument("--negative-prompt", default=defaults.NEGATIVE_PROMPT,
                     help="what to steer away from, used when --cfg is not 1 (default: a single space, as the reference)")
    gen.add_argument("--steps", type=int, default=defaults.STEPS, help=f"Euler sampling steps, up to {MAX_STEPS}")
    gen.add_argument("--cfg", type=float, default=defaults.CFG, help="classifier-free guidance scale; 1 disables the negative pass")
    gen.add_argument("--seed", type=int, default=defaults.SEED, help="noise seed, 0 to 2**64-1; image i of a batch uses seed+i (wrapping past 2**64-1 to 0)")
    gen.add_argument("--width", type=int, default=defaults.SIZE, help=f"image width, a multiple of 16 up to {MAX_RESOLUTION}")
    gen.add_argument("--height", type=int, default=defaults.SIZE, help=f"image height, a multiple of 16 up to {MAX_RESOLUTION}")
    gen.add_argument("--batch-size", type=int, default=1, help=f"images per run, up to {MAX_BATCH_SIZE}")
    gen.add_argument("--image", type=Path, help="input image for image-to-image")
    gen.add_argument("--denoise", type=float, default=None, help=f"image-to-image strength in (0, 1]; default {defaults.IMG2IMG_DENOISE} with --image, else 1")
    gen.add_argument("--dit", type=Path, help="AAADiT .safetensors (default: download step-600000 from ModelScope)")
    gen.add_argument("--vae", type=Path, help="FLUX.2 VAE .safetensors (default: download from ModelScope)")
    gen.add_argument("--text-encoder", type=Path, help="Qwen3-0.6B model.safetensors or its folder (default: download)")
    gen.add_argument("--model-dir", type=Path, help="where downloaded models are kept (default: $AAA_MODEL_DIR or ~/.cache/aaa_dit)")
    gen.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPUs and CPUs that support it, else float16 on GPUs, float32 on CPUs), float32, bfloat16 or float16")
    gen.add_argument("--output", type=Path, required=True, help="output PNG; a batch writes NAME_0.png, NAME_1.png, ...; missing folders are created")
    return parser


def output_paths(output: Path, batch_size: int) -> list[Path]:
    """``out.png`` for one image, ``out_0.png``, ``out_1.png``... for a batch."""
    if output.suffix.lower() != ".png":
        raise InputError(f"--output {output}: must end in .png")
    if batch_size == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(batch_size)]


def generate(args: argparse.Namespace) -> list[Path]:
    """Validates everything cheap first, then loads the models, samples and writes the PNGs."""
    from .pipeline import AAAPipeline, GenerationSettings  # torch-heavy imports after argument parsing
    from .png_metadata import png_info, provenance

    denoise = args.denoise if args.denoise is not None else (defaults.IMG2IMG_DENOISE if args.image else 1.0)
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg,
        seed=args.seed, width=args.width, height=args.height, batch_size=args.batch_size, denoise=denoise,
        names=SETTING_FLAGS,
    )
    settings.check_image(args.image is not None)
    paths = output_paths(args.output, args.batch_size)
    check_writable(paths)
    device = resolve_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, device, "--dtype")
    image = open_rgb(args.image) if args.image else None
    for left_over in sweep_temp_files(paths[0].parent):
        log.info("deleted %s (left by an interrupted run)", left_over)

    with out_of_memory_as_error(f"loading the models on {device} in {dtype}", _memory_advice(dtype, generating=False)):
        pipe = AAAPipeline.from_files(args.dit, args.vae, args.text_encoder, str(device), args.dtype, args.model_dir)
    doing = f"generating {settings.batch_size} image(s) of {settings.width}x{settings.height} on {device} in {dtype}"
    with out_of_memory_as_error(doing, _memory_advice(dtype, generating=True)):
        with tqdm(total=settings.steps, desc="sampling", unit="step") as bar:
            images = pipe.generate(settings, image, callback=lambda done, total, x0: bar.update(1))
    made = provenance(args.dit, args.text_encoder, args.vae, pipe.dtype, args.image)
    with atomic_outputs(paths) as temps:
        for index, (temp, picture) in enumerate(zip(temps, images)):
            picture.save(temp, format="PNG", pnginfo=png_info(settings, index, made))
    for path in paths:
        log.info("wrote %s", path)
    return paths


def _memory_advice(dtype: torch.dtype, generating: bool) -> str:
    """What to reduce after an out-of-memory error."""
    options = ["reduce --batch-size", "reduce --width/--height"] if generating else []
    if dtype == torch.float32:
        options.append("use --dtype bfloat16")
    options.append("or use another --device" if options else "use another --device")
    return ", ".join(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        generate(args)
    except AAAError as err:
        print(f"error: {err}{ways_out(err, MODEL_FLAGS)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
