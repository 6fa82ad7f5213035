"""Quality in a given time: the validation loss two trainer settings reach against wall time.

    python -m benchmarks.quality                                    # constant lr against cosine decay
    python -m benchmarks.quality --a "--caption-dropout 0" --b "--caption-dropout 0.1" --seconds 300
    python -m benchmarks.quality --vae FLUX2_VAE --text-encoder QWEN3   # the real encoders (default: random small ones)

Throughput alone (``train_throughput.py``) does not say whether a change trains a better model:
this trains the same small DiT twice, once with the flags of ``--a`` and once with those of
``--b``, on a data set it draws itself (coloured shapes captioned "a red circle, left"), holding
some images out by name, and prints the held-out loss (fixed timesteps, fixed noise:
``training/validation.py``) at each validation with the seconds since training began.

Without ``--vae`` and ``--text-encoder`` it writes random-weight encoders of the real classes at
small widths (as the tests do), so it runs anywhere, offline, in minutes on a CPU; the numbers
then compare settings with each other, not with a real model's losses. Both runs use the same
seed, data, held-out images and encoding cache (encoded once, before the first run's clock).
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.config import parse_config
from training.train import train

log = logging.getLogger("benchmark")

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right")


def draw_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` images of one coloured shape on a grey background, each with its caption in a .txt beside it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PLACES)
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
        radius = size * rng.uniform(0.15, 0.25)
        cx = size * (0.3 if place == "left" else 0.7) + rng.uniform(-0.05, 0.05) * size
        cy = size * rng.uniform(0.35, 0.65)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLOURS[colour])
        image.save(folder / f"shape{i:04d}.png")
        (folder / f"shape{i:04d}.txt").write_text(f"a {colour} {shape}, {place}", encoding="utf-8")
    return folder


def random_encoders(folder: Path) -> tuple[Path, Path]:
    """Random-weight FLUX.2-layout VAE and Qwen3 files at small widths (the tests' writers: real key names)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_tiny_text_encoder, save_tiny_vae

    return save_tiny_vae(folder / "vae.safetensors"), save_tiny_text_encoder(folder / "text_encoder")


def validation_curve(train_log: Path) -> list[tuple[int, float, float, float]]:
    """(step, seconds since training began, EMA loss, raw loss) of each validation line in a run's train.log."""
    start, curve = None, []
    for line in train_log.read_text(encoding="utf-8").splitlines():
        when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") if line[:4].isdigit() else None
        if "training steps" in line:
            start = when
        found = re.search(r"step (\d+) \| validation loss .* \| ema ([\d.]+) .* \| raw ([\d.]+) ", line)
        if found and start is not None:
            curve.append((int(found[1]), (when - start).total_seconds(), float(found[2]), float(found[3])))
    return curve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--a", default="--lr-schedule constant", help="trainer flags of the first run")
    parser.add_argument("--b", default="--lr-schedule cosine --min-lr 2e-5", help="trainer flags of the second run")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each run")
    parser.add_argument("--validate-every", type=int, default=50, help="steps between validations")
    parser.add_argument("--images", type=int, default=96, help="images drawn; 16 of them are held out")
    parser.add_argument("--resolution", type=int, default=64, help="side of the drawn images and of training, in pixels")
    parser.add_argument("--size", default="--dim 128 --depth 4 --num-heads 4", help="DiT size flags")
    parser.add_argument("--vae", default=argparse.SUPPRESS, help="FLUX.2 VAE file (default: random small weights)")
    parser.add_argument("--text-encoder", default=argparse.SUPPRESS, help="Qwen3 file, with --vae (default: random small weights)")
    parser.add_argument("--folder", type=Path, default=argparse.SUPPRESS,
                        help="where the data, cache and runs go (default: a temporary folder)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if hasattr(args, "vae") != hasattr(args, "text_encoder"):
        parser.error("pass --vae and --text-encoder together (or neither, for random small encoders)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    with tempfile.TemporaryDirectory() as temporary:
        root = getattr(args, "folder", None) or Path(temporary)
        data = draw_images(root / "data", args.images, args.resolution)
        given = getattr(args, "vae", None), getattr(args, "text_encoder", None)
        vae, text_encoder = given if all(given) else random_encoders(root / "encoders")
        common = ["--data", str(data), "--vae", str(vae), "--text-encoder", str(text_encoder), "--cache-dir", str(root / "cache"),
                  "--resolution", str(args.resolution), *shlex.split(args.size), "--batch-size", "8", "--lr", "5e-4",
                  "--warmup", "linear", "--warmup-steps", "20", "--ema-decay", "0.99", "--max-steps", str(args.steps),
                  "--validation-split", "16", "--validate-every", str(args.validate_every), "--sample-every", "0",
                  "--save-every", "0", "--log-every", "100", "--no-tensorboard", "--overwrite"]
        curves = {}
        for name, flags in (("a", args.a), ("b", args.b)):
            out = root / f"run-{name}"
            train(parse_config(common + ["--output-dir", str(out), *shlex.split(flags)]))
            curves[name] = validation_curve(out / "train.log")
        print(f"validation loss on 16 held-out images, {args.steps} steps each (EMA / raw weights)")
        print(f"  a: {args.a}\n  b: {args.b}")
        print(f"{'step':>6} | {'a: s':>7} {'a: EMA':>8} {'a: raw':>8} | {'b: s':>7} {'b: EMA':>8} {'b: raw':>8}")
        for (step, ta, ea, ra), (_, tb, eb, rb) in zip(curves["a"], curves["b"]):
            print(f"{step:>6} | {ta:>7.1f} {ea:>8.4f} {ra:>8.4f} | {tb:>7.1f} {eb:>8.4f} {rb:>8.4f}")


if __name__ == "__main__":
    main()
