"""Device and dtype choice for plain-PyTorch use (CLI, training, tests).

Inside ComfyUI the nodes use ComfyUI's own device management instead; these helpers are the
fallback and the CLI's ``--device`` / ``--dtype`` options.
"""

from __future__ import annotations

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


def resolve_device(name: str = "auto") -> torch.device:
    """Maps ``auto|cpu|cuda|cuda:N|mps`` to a device, checking that it exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for, but PyTorch sees no Apple GPU here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Maps ``auto|float32|bfloat16|float16`` to a compute dtype for ``device``.

    ``auto`` picks bfloat16 on GPUs that support it (the dtype the published checkpoint was
    trained and sampled in), float16 on other GPUs and MPS, and float32 on the CPU, where
    half-precision matmuls are slower than float32 ones.
    """
    if name != "auto":
        try:
            return DTYPES[name]
        except KeyError:
            raise InputError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
