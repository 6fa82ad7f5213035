"""Device and dtype choice for plain-PyTorch use (CLI, training, tests).

Inside ComfyUI the nodes use ComfyUI's own device management instead; these helpers are the
fallback and the CLI's ``--device`` / ``--dtype`` options.
"""

from __future__ import annotations

import re

import torch

from .errors import InputError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


_DEVICE_NAME = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def resolve_device(name: str = "auto", label: str = "device") -> torch.device:
    """Maps ``auto|cpu|cuda|cuda:N|mps`` to a device, checking that it exists here.

    ``cpu:N`` means ``cpu`` (there is one CPU device). ``label`` is what errors call the option.
    """
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = _DEVICE_NAME.fullmatch(key)
    if match is None:
        raise InputError(f"{label} {name!r}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{label} {name!r}: PyTorch sees no Apple GPU (MPS) here; use cpu")
        if index not in (None, "0"):
            raise InputError(f"{label} {name!r}: there is only one MPS device; use mps")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise InputError(f"{label} {name!r}: PyTorch sees no CUDA GPU here; use cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise InputError(f"{label} {name!r}: there is no such GPU; this machine has {count} (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda" if index is None else f"cuda:{int(index)}")


def resolve_dtype(name: str, device: torch.device, label: str = "dtype") -> torch.dtype:
    """Maps ``auto|float32|bfloat16|float16`` to a compute dtype for ``device``.

    ``auto`` picks bfloat16 on GPUs that support it (the dtype the published checkpoint was
    trained and sampled in), float16 on other GPUs and MPS, and float32 on the CPU, where
    half-precision matmuls are slower than float32 ones. ``label`` is what errors call the option.
    """
    key = name.strip().lower()
    if key != "auto":
        try:
            return DTYPES[key]
        except KeyError:
            raise InputError(f"{label} {name!r}: unknown dtype; use auto, float32, bfloat16 or float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
