"""Aspect-ratio buckets: the image shapes a run trains at, and which one each image goes to.

``--buckets square`` is the classic square crop; ``aspect`` (or an explicit list of sizes) lets
wide and tall pictures keep their shape: each image is resized to cover the bucket nearest its
aspect ratio and centre-cropped there, and every micro-batch holds images of one bucket.
Sides are multiples of 16 because the FLUX.2 VAE downsamples by 16 (latent side = pixel side / 16).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from fractions import Fraction

from PIL import ExifTags, Image

from aaa_core.errors import InputError
from aaa_core.geometry import DOWNSCALE
from aaa_core.images import image_file_errors
from aaa_core.limits import MAX_RESOLUTION

MAX_RATIO = 2  # "aspect": from 1:2 to 2:1
SPEC_HELP = ("use 'square', 'aspect' or a list of WIDTHxHEIGHT sizes such as '512x256,256x512,384x384' "
             f"(sides multiples of {DOWNSCALE} up to {MAX_RESOLUTION})")
# EXIF orientations that ImageOps.exif_transpose (and so open_rgb) turns by 90 or 270 degrees.
_SIDES_SWAPPED = {5, 6, 7, 8}


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One training shape in pixels; both sides are multiples of 16."""

    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of its latents."""
        return self.height // DOWNSCALE, self.width // DOWNSCALE


def parse_buckets(spec: str, resolution: int) -> list[Bucket]:
    """The buckets of ``--buckets SPEC`` at ``--resolution R``; a one-line ``InputError`` names a bad part."""
    kind = spec.strip().lower()
    if kind == "square":
        return [Bucket(resolution, resolution)]
    if kind == "aspect":
        return aspect_buckets(resolution)
    buckets = [_parse_size(part.strip(), spec) for part in kind.split(",")]
    repeated = sorted({b.name for b in buckets if buckets.count(b) > 1})
    if repeated:
        raise InputError(f"buckets {spec!r}: {', '.join(repeated)} listed more than once; list each size once")
    return buckets  # in the user's order, which breaks ties in assign_bucket


def _parse_size(part: str, spec: str) -> Bucket:
    match = re.fullmatch(r"(\d+)x(\d+)", part, re.ASCII)
    if match is None:
        raise InputError(f"buckets {spec!r}: {part!r} is not WIDTHxHEIGHT; {SPEC_HELP}")
    for side in match.groups():  # the length first: int() refuses thousands of digits with a traceback
        if len(side) > len(str(MAX_RESOLUTION)) or int(side) % DOWNSCALE or not 0 < int(side) <= MAX_RESOLUTION:
            raise InputError(f"buckets {spec!r}: {part!r} has a side of {side}; {SPEC_HELP}")
    return Bucket(int(match[1]), int(match[2]))


def aspect_buckets(resolution: int) -> list[Bucket]:
    """Shapes of about R*R pixels (never more) from 1:2 to 2:1, sorted, with R x R among them.

    Each long side from R to R*sqrt(2) gets the longest short side that keeps the area within
    R*R; where two long sides get the same short side only the larger shape is kept (they differ
    by 16 pixels: more buckets would only split the data finer). Tall shapes mirror the wide ones.
    """
    area = resolution * resolution
    longest: dict[int, int] = {}  # short side -> the longest long side it pairs with
    for long in range(resolution, math.floor(resolution * math.sqrt(2)) + 1, DOWNSCALE):
        short = area // long // DOWNSCALE * DOWNSCALE
        if short and long <= MAX_RESOLUTION and long <= MAX_RATIO * short:
            longest[short] = long
    return sorted({Bucket(long, short) for short, long in longest.items()} | {Bucket(short, long) for short, long in longest.items()})


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` in log space.

    Nearest in log ratio means least cropping once the image is resized to cover the bucket
    (a 2:1 image in a 1:2 bucket loses as much as a 1:2 image in a 2:1 one). Compared as exact
    fractions, so ties are real ties and go to the first bucket in the list.
    """
    if width <= 0 or height <= 0 or not buckets:
        raise ValueError(f"assign_bucket needs a positive size and at least one bucket, got {width}x{height}, {buckets}")

    def log_distance(bucket: Bucket) -> Fraction:  # exp(|log(w/h) - log(bw/bh)|), without rounding
        a, b = width * bucket.height, height * bucket.width
        return Fraction(max(a, b), min(a, b))

    return min(range(len(buckets)), key=lambda i: log_distance(buckets[i]))


def image_size(path: "str | os.PathLike[str]") -> tuple[int, int]:
    """(width, height) of the picture ``open_rgb`` would give, read from the file header only.

    Unreadable files raise the same one-line ``InputError`` as ``open_rgb``.
    """
    with image_file_errors(path), Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _SIDES_SWAPPED else (width, height)


def wide_and_tall(buckets: list[Bucket]) -> list[tuple[int, int]]:
    """(width, height) of the widest and the tallest bucket, for the sample grids; each only if not square.

    Among equal ratios the larger one wins, then the first listed.
    """
    def wideness(bucket: Bucket) -> tuple[Fraction, int]:
        return Fraction(bucket.width, bucket.height), bucket.width * bucket.height

    widest = max(buckets, key=wideness)
    tallest = max(buckets, key=lambda b: wideness(Bucket(b.height, b.width)))
    sizes = [(widest.width, widest.height)] if widest.width > widest.height else []
    return sizes + ([(tallest.width, tallest.height)] if tallest.height > tallest.width else [])
