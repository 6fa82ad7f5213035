"""Turns the two ways a generation fails after its inputs were accepted into one-line errors.

Numbers that overflow to NaN/inf would otherwise decode to a black image that is saved as if
nothing happened; an out-of-memory error would otherwise end in a long traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import ComputeError

# Guidance scales above this multiply the DiT's output enough to blow up the latents.
LARGE_CFG = 30.0
# How torch phrases a failed allocation outside torch.OutOfMemoryError (CPU allocator, MPS).
_OUT_OF_MEMORY_TEXT = ("not enough memory", "out of memory", "can't allocate memory")


# Normalised FLUX.2 latents are about standard normal; far beyond this they decode to garbage or inf.
LATENT_RANGE = 1e3


def require_finite(
    tensor: torch.Tensor, what: str, dtype: torch.dtype, cfg: float | None = None, inputs: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns ``tensor`` if it holds no NaN/inf, else raises a one-line error with the likely cause.

    ``dtype`` is the compute dtype, ``cfg`` the guidance scale and ``inputs`` the latents that
    ``tensor`` was computed from, where known: they narrow down the cause.
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return tensor
    bad = tensor.numel() - int(finite.sum())
    raise ComputeError(f"{what} hold {bad} NaN/inf values out of {tensor.numel()}: {_likely_cause(dtype, cfg, inputs)}")


def _likely_cause(dtype: torch.dtype, cfg: float | None, inputs: torch.Tensor | None) -> str:
    if inputs is not None:
        if not bool(torch.isfinite(inputs).all()):
            return "its input latents already hold NaN/inf (made by a node or step that failed before)"
        largest = inputs.detach().abs().max().float().item()
        if largest > LATENT_RANGE:
            return f"its input latents reach {largest:.3g}, far outside their usual range (made with too large a cfg, or by a broken model?)"
    if dtype == torch.float16:
        return "float16 overflow: use bfloat16 or float32"
    if cfg is not None and abs(cfg) > LARGE_CFG:
        return f"cfg {cfg} is too large: use a value between 1 and 15"
    return "the model weights may hold NaN/inf (a corrupt or diverged checkpoint): try another file"


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's CUDA OutOfMemoryError, Python's MemoryError and the CPU/MPS allocators' RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _OUT_OF_MEMORY_TEXT)


@contextlib.contextmanager
def out_of_memory_as_error(doing: str, advice: str) -> Iterator[None]:
    """Re-raises an out-of-memory error inside the block as one line: what ran out and what to reduce."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise ComputeError(f"out of memory while {doing}: {advice}") from None
