"""Device and dtype choice for plain-PyTorch use (CLI, training, tests).

Inside ComfyUI the nodes use ComfyUI's own device management instead; these helpers are the
fallback and the CLI's ``--device`` / ``--dtype`` options.
"""

from __future__ import annotations

import functools
import logging
import os
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
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # the loaders' weight_dtype names


log = logging.getLogger(__name__)

CPU_BF16_ENV = "AAA_CPU_BF16"  # 1 or 0 overrides the detection below (tests, or a CPU it misjudges)
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
    trained and sampled in), float16 on other GPUs and MPS, bfloat16 on CPUs with native bf16
    (:func:`cpu_has_native_bf16`), and float32 on other CPUs, where half-precision matmuls are
    emulated and slower than float32 ones. ``label`` is what errors call the option.
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
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def bf16_is_native(device_type: str) -> bool:
    """The trainer's "auto": bf16 on CUDA GPUs and on CPUs that compute it natively, fp32 elsewhere."""
    return device_type == "cuda" or cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 beats float32.

    Elsewhere bf16 is emulated and slower than float32. ``AAA_CPU_BF16=1`` or ``0`` overrides it.
    """
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise InputError(f"{CPU_BF16_ENV}={override!r}: use 1 (the CPU has native bf16) or 0 (it has not), or unset it")
    return _detect_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _detect_cpu_bf16() -> bool:
    """Asks PyTorch's own CPU feature probe (cpuinfo: Linux, Windows and macOS alike).

    That probe is private API, so a PyTorch without it reads the Linux kernel's flags instead,
    and anything else (no such file: macOS, Windows) counts as no bf16: float32 is never wrong.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        found = any(probe() for probe in probes)
    else:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                flags = set(handle.read().split())
        except OSError:
            flags = set()
        found = bool(flags & {"avx512_bf16", "amx_bf16"})
    log.debug("CPU native bf16 (AVX512-BF16 or AMX): %s", found)
    return found
