"""Bounds and value checks for generation inputs, shared by the CLI, the pipeline and the nodes.

The bounds are the nodes' widget ranges, so a setting the CLI accepts is one a node accepts too.
Every check takes the ``name`` to show (a CLI flag such as ``--cfg``, or a node's widget name),
so the one-line error points at what to change.
"""

from __future__ import annotations

import math

from .errors import InputError

MAX_RESOLUTION = 8192  # pixels per side: ComfyUI's nodes.MAX_RESOLUTION in the 2024 tree (16384 in 0.10)
MAX_BATCH_SIZE = 4096
MAX_STEPS = 10000
SEED_MAX = 2**64 - 1  # torch generators take seeds up to 2**64 - 1, as ComfyUI's KSampler offers


def check_int_range(name: str, value: int, low: int, high: int) -> None:
    """``low <= value <= high``, else a one-line error naming ``name``."""
    if not low <= value <= high:
        raise InputError(f"{name} {value}: must be between {low} and {high}")


def check_finite(name: str, value: float) -> None:
    """Refuses NaN and infinity, which range checks (``value < low``) let through."""
    if not math.isfinite(value):
        raise InputError(f"{name} {value}: must be a finite number")


def check_text(name: str, text: str) -> None:
    """Refuses text that cannot be encoded as UTF-8 (lone surrogates) or that holds NUL characters.

    A shell passes bytes that are not valid in its locale's encoding to Python as lone
    surrogates (``\\udcff`` for the byte 0xff); they would fail later, deep in the tokenizer
    or the PNG writer.
    """
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            byte = f" (byte 0x{ord(char) - 0xDC00:02x})" if "\udc80" <= char <= "\udcff" else ""
            raise InputError(
                f"{name}: character {position} is not valid text{byte}; pass the prompt as UTF-8 "
                "(check the terminal's or file's encoding)"
            )
        if char == "\0":
            raise InputError(f"{name}: character {position} is a NUL character; remove it from the prompt")
