"""Finding the training pairs: a metadata CSV (reference layout) or a folder of images with .txt captions.

Layouts understood (``docs/diffsynth-aaa.md`` sections 9 and 12):

- ``folder/metadata.csv`` with columns ``image`` and ``prompt``, image paths relative to the CSV's
  folder or to its ``images/`` subfolder; ``--data`` may name the folder or the CSV itself.
  DiffSynth-Studio/pokemon-gen1 (``data/metadata_merged.csv``, paths relative to ``data/images``)
  is this layout.
- A folder of images (searched recursively) each with a same-named ``.txt`` caption.

A pair that cannot be used (missing caption, missing image file) is reported by name and
skipped; an image that turns out to be unreadable is skipped later, when it is encoded.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import torch

from aaa_core.errors import InputError
from aaa_core.images import open_rgb, pil_to_tensor, resize_cover
from aaa_core.input_files import not_a_file_message, special_file_kind

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CSV_NAMES = ("metadata.csv", "metadata_merged.csv")  # preferred names when a folder holds several CSVs
IMAGE_COLUMN = "image"
PROMPT_COLUMNS = ("prompt", "caption", "text")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training pair."""

    image: Path
    caption: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A pair left out, with the reason shown to the user."""

    name: str
    reason: str


def find_samples(data: "str | Path") -> tuple[list[Sample], list[Skipped]]:
    """Lists the usable pairs of a data set and the ones skipped (missing caption or image file)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"{path}: training data not found (expected a folder or a metadata .csv)")
    if not path.is_dir():
        if path.suffix.lower() != ".csv":
            raise InputError(f"{path}: expected a folder or a .csv file with columns '{IMAGE_COLUMN}' and 'prompt'")
        samples, skipped = _from_csv(path)
    else:
        csv_file = _find_csv(path)
        samples, skipped = _from_csv(csv_file) if csv_file else _from_caption_files(path)
    if not samples:
        raise InputError(f"{path}: no usable image/caption pairs ({len(skipped)} skipped)")
    return samples, skipped


def _find_csv(folder: Path) -> Path | None:
    for name in CSV_NAMES:
        if (folder / name).exists() and not (folder / name).is_dir():  # a FIFO too: _from_csv refuses it
            return folder / name
    candidates = sorted(p for p in folder.glob("*.csv") if not p.is_dir())
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise InputError(f"{folder}: several CSV files ({names}); pass the one to use as --data")
    return candidates[0] if candidates else None


def _from_csv(csv_file: Path) -> tuple[list[Sample], list[Skipped]]:
    kind = special_file_kind(csv_file)
    if kind is not None:
        raise InputError(not_a_file_message(csv_file, kind, f"a CSV file with columns '{IMAGE_COLUMN}' and 'prompt'"))
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{csv_file}: cannot be read as CSV ({err})") from None
    prompt_column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if IMAGE_COLUMN not in columns or prompt_column is None:
        raise InputError(f"{csv_file}: needs columns '{IMAGE_COLUMN}' and 'prompt', found {', '.join(columns) or 'none'}")
    roots = (csv_file.parent, csv_file.parent / "images")
    samples, skipped = [], []
    for line, row in enumerate(rows, start=2):
        name = (row.get(IMAGE_COLUMN) or "").strip()
        caption = (row.get(prompt_column) or "").strip()
        if not name:
            skipped.append(Skipped(f"{csv_file.name} line {line}", "no image path"))
            continue
        image = next((root / name for root in roots if (root / name).is_file()), None)
        if image is None:
            skipped.append(Skipped(name, f"image file not found next to {csv_file.name} or in images/"))
        elif not caption:
            skipped.append(Skipped(name, "empty prompt"))
        else:
            samples.append(Sample(image, caption))
    return samples, skipped


def _from_caption_files(folder: Path) -> tuple[list[Sample], list[Skipped]]:
    images = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not images:
        raise InputError(f"{folder}: no metadata .csv and no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    samples, skipped = [], []
    for image in images:
        name = str(image.relative_to(folder))
        caption_file = image.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        except (OSError, UnicodeDecodeError) as err:
            skipped.append(Skipped(name, f"caption {caption_file.name} unreadable ({err})"))
            continue
        if caption:
            samples.append(Sample(image, caption))
        else:
            skipped.append(Skipped(name, f"no caption ({caption_file.name} missing or empty)"))
    return samples, skipped


# Part of every latent's cache key: bump it when load_image's pixels change (file decoding,
# resize, crop), so that latents made the old way are encoded again.
PREPROCESS_VERSION = "open_rgb-alpha-dropped-high-bit-scaled+resize_cover-bilinear+centre-crop/2"


def load_image(path: Path, width: int, height: int, dtype: torch.dtype) -> torch.Tensor:
    """``(3, height, width)`` pixels in [-1, 1]: read as ComfyUI's Load Image does, resized to cover, centre-cropped.

    Raises ``InputError`` naming the file if it is not a readable image (or too large to open).
    """
    image = resize_cover(open_rgb(path), width, height)
    return pil_to_tensor(image, dtype)[0]


def report_skipped(skipped: list[Skipped], total: int) -> None:
    """One warning per skipped pair plus a count, so a bad file is easy to find and fix."""
    if not skipped:
        log.info("data: all %d pairs usable", total)
        return
    for item in skipped:
        log.warning("skipped %s: %s", item.name, item.reason)
    reasons: dict[str, int] = {}
    for item in skipped:
        key = item.reason.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
    log.warning("data: %d of %d pairs skipped (%s)", len(skipped), total, summary)
