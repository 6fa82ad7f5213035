"""Safetensors I/O shared by every model: validated reads, model identification, atomic writes.

All three model files (AAADiT, FLUX.2 VAE, Qwen3-0.6B) are plain safetensors. Reading them goes
through :func:`load_checkpoint`, which turns every failure (missing or unreadable file, truncated
download, wrong model picked in a dropdown, NaN weights) into a one-line :class:`ModelFileError`
that names the file. :func:`read_header` reads names, dtypes and shapes alone, so files can be
checked before any is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelFileError, OutputError
from .input_files import not_a_file_message, special_file_kind
from .outputs import atomic_output

# One signature per model kind: keys that only that model's state dict has.
AAADIT = "aaadit"
FLUX2_VAE = "flux2_vae"
QWEN3 = "qwen3"

MODEL_NAMES = {
    AAADIT: "an AAADiT diffusion model",
    FLUX2_VAE: "a FLUX.2 VAE",
    QWEN3: "a Qwen3 text encoder",
}

_EXAMPLE_KEYS = {
    AAADIT: "pos_embedder.image_emb, blocks.0.to_gate.weight",
    FLUX2_VAE: "decoder.conv_in.weight, bn.running_mean",
    QWEN3: "model.layers.0.self_attn.q_norm.weight",
}


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (any dtype, bfloat16 included), for checksums."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def identify_model(keys: "Iterator[str] | set[str] | list[str]") -> str | None:
    """Returns the model kind a set of state-dict keys belongs to, or ``None`` if unknown."""
    keys = set(keys)
    if "pos_embedder.image_emb" in keys and "blocks.0.to_gate.weight" in keys:
        return AAADIT
    if "decoder.conv_in.weight" in keys and "bn.running_mean" in keys:
        return FLUX2_VAE
    if any(k.endswith("layers.0.self_attn.q_norm.weight") for k in keys):
        return QWEN3
    return None


def _describe_foreign(keys: set[str]) -> str:
    """Names what a file holds when it is not one of our three models, for error messages."""
    kind = identify_model(keys)
    if kind is not None:
        return MODEL_NAMES[kind]
    if "decoder.conv_in.weight" in keys or "first_stage_model.decoder.conv_in.weight" in keys:
        return "a VAE without FLUX.2's batch-norm latent statistics (bn.running_mean)"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a full Stable Diffusion style checkpoint"
    return "an unknown model"


def check_path(path: "str | os.PathLike[str]", what: str = "file", missing_ok: bool = False) -> os.stat_result | None:
    """Stats ``path``, or raises a one-line error: missing (``None`` if ``missing_ok``), or a folder on
    the way cannot be searched (``Path.exists()`` raises a bare ``PermissionError`` for that)."""
    path = Path(path)
    try:
        return path.stat()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ModelFileError(f"{path}: {what} not found") from None
    except PermissionError:
        locked = next((p for p in reversed(path.parents) if not os.access(p, os.X_OK)), path.parent)
        raise ModelFileError(
            f"{path}: permission denied: this user cannot look inside the folder {locked} (it needs search permission)"
        ) from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be accessed ({err.strerror or err})") from None


def check_readable_file(path: "str | os.PathLike[str]") -> None:
    """Raises a one-line error unless ``path`` is a file this process may read."""
    path = Path(path)
    if stat.S_ISDIR(check_path(path).st_mode):
        raise ModelFileError(f"{path}: is a folder, expected a .safetensors file")
    kind = special_file_kind(path)
    if kind is not None:
        raise ModelFileError(not_a_file_message(path, kind, "a .safetensors file"))
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied: this user may not read the file (check its permissions)") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err})") from None


@contextlib.contextmanager
def _open_safetensors(path: Path, device: "str | torch.device" = "cpu") -> Iterator:
    """``safe_open`` with every failure turned into a one-line error naming the file.

    ``safe_open`` checks that the header covers the file exactly, so a truncated or padded
    file (an interrupted download) is caught here, before any tensor is read.
    """
    check_readable_file(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            yield handle
    except SafetensorError as err:
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({err}); the download may be "
            "incomplete or corrupt, fetch it again"
        ) from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err})") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor as the safetensors header describes it, without its data."""

    dtype: str  # safetensors' name: F32, BF16, I64, BOOL, ...
    shape: tuple[int, ...]

    def is_floating_point(self) -> bool:  # named as torch's, so checks take a tensor or a header entry
        return self.dtype.startswith(("F", "BF"))


def read_header(path: "str | os.PathLike[str]") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor names, dtypes and shapes and the metadata of a safetensors file, reading no tensor data.

    Cheap even for the largest model, so all three files can be checked before any is loaded.
    """
    path = Path(path)
    with _open_safetensors(path) as handle:
        metadata = dict(handle.metadata() or {})
        header = {}
        for key in handle.keys():
            tensor = handle.get_slice(key)
            header[key] = TensorInfo(tensor.get_dtype(), tuple(tensor.get_shape()))
    return header, metadata


def check_model_file(path: "str | os.PathLike[str]", kind: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The first check of every model file (loaders, preflight, downloads): its header is readable and
    holds the model ``kind``. Returns the header and metadata; no tensor data is read."""
    header, metadata = read_header(path)
    check_kind(header, kind, path)
    return header, metadata


def read_safetensors(
    path: "str | os.PathLike[str]",
    dtype: torch.dtype | None = None,
    device: "str | torch.device" = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a safetensors file tensor by tensor; floating tensors are cast to ``dtype``.

    Casting one tensor at a time keeps peak memory at one copy of the model. Integer
    buffers (BatchNorm's ``num_batches_tracked``) keep their dtype.
    """
    path = Path(path)
    state_dict: dict[str, torch.Tensor] = {}
    with _open_safetensors(path, device) as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state_dict[key] = tensor
    return state_dict, metadata


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], path: "str | os.PathLike[str]") -> None:
    """Raises a one-line error naming the first floating tensor that holds NaN or infinity.

    Such weights give black or noise images with no error; one ``isfinite`` pass per tensor is cheap.
    """
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        with safe_open(str(path), framework="pt") as handle:  # the stored values: corrupt, or overflowed by a cast?
            stored = handle.get_tensor(key)
        if bool(torch.isfinite(stored).all()):
            raise ModelFileError(
                f"{path}: tensor {key} overflows {str(tensor.dtype).removeprefix('torch.')} (values up to "
                f"{stored.abs().max().item():.3g}); load it in fp32 or bf16"
            )
        raise ModelFileError(
            f"{path}: tensor {key} holds NaN or infinite values; the file is corrupt (or from a diverged "
            "training run): use another copy"
        )


def check_kind(keys: "set[str] | Mapping[str, object]", expected: str, path: "str | os.PathLike[str]") -> None:
    """Raises a clear error when a state dict is not the expected model kind."""
    keys = set(keys)
    if identify_model(keys) == expected:
        return
    raise ModelFileError(
        f"{path}: holds {_describe_foreign(keys)}, but {MODEL_NAMES[expected]} was expected "
        f"(keys such as {_EXAMPLE_KEYS[expected]})"
    )


def load_checkpoint(
    path: "str | os.PathLike[str]",
    expected: str,
    dtype: torch.dtype | None = None,
    device: "str | torch.device" = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a safetensors file and checks that it holds the ``expected`` model kind, with finite weights."""
    state_dict, metadata = read_safetensors(path, dtype=dtype, device=device)
    check_kind(state_dict, expected, path)
    check_finite_weights(state_dict, path)
    return state_dict, metadata


def check_state_dict_matches(
    model: torch.nn.Module, state_dict: "Mapping[str, torch.Tensor | TensorInfo]", path: "str | os.PathLike[str]"
) -> None:
    """Raises a one-line error if ``state_dict`` does not fit ``model`` key for key, shape for shape.

    Also takes a header from :func:`read_header`, to check a file before reading it. Loaded
    tensors must also be floating point where the model has weights (an int or bool tensor
    would load and fail deep inside the first forward pass).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ModelFileError(f"{path}: keys do not match the model: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ModelFileError(
                f"{path}: tensor {key} has shape {tuple(state_dict[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
        given = state_dict[key]
        if tensor.is_floating_point() and not given.is_floating_point():
            raise ModelFileError(
                f"{path}: tensor {key} is {str(given.dtype).removeprefix('torch.')}, expected floating-point weights"
            )


def adopt_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: "str | os.PathLike[str]"
) -> torch.nn.Module:
    """Loads ``state_dict`` strictly into ``model`` built on the meta device: the tensors are
    adopted, not copied (one copy of the weights in memory). Returns it frozen, in eval mode."""
    check_state_dict_matches(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: "str | os.PathLike[str]",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``state_dict`` atomically as safetensors (contiguous CPU copies, string metadata)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as err:
            # safetensors reports I/O failures as its own error; as an OSError they get the usual one-line message
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise OutputError(path, str(err)) from None
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
