"""LoRA fine-tuning: low-rank adapters on a frozen AAADiT, and the LoRA files they are saved as.

Each targeted linear layer ``W`` gets a down matrix ``A`` (rank, in), initialised as PEFT does
(Kaiming-uniform), and an up matrix ``B`` (out, rank) of zeros, so training starts exactly at the
base model; the layer then computes ``W x + alpha/rank * B A x``. The adapters form one module,
:class:`LoraAdapters`: it is all that the optimizer, the EMA and the training states hold, while
the DiT only calls into it. Saved files use kohya keys (``lora_unet_blocks_0_to_q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), the layout ComfyUI's own LoraLoaderModelOnly reads for AAADiT on
the 2024 release and on current ones. Key names and the merge ``W + scale * B @ A`` are
``aaa_core.lora``'s, shared with the LoRA node and the export.

A small module of our own rather than ``peft``: peft would rename the DiT's modules
(``base_layer``) and save ``lora_A``/``lora_B`` keys without a prefix, which ComfyUI does not
read for our model, and the adapter itself is a few lines.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from aaa_core.checkpoint import file_sha256, read_safetensors, save_safetensors
from aaa_core.dit import AAADiT, load_dit
from aaa_core.errors import InputError
from aaa_core.lora import LoraPair, kohya_stem, linear_weight_shapes, merge_lora, read_lora, to_kohya

from .sample_grids import side_by_side
from .state_files import DAMAGED

log = logging.getLogger(__name__)

BASE_HASH_KEY = "aaa_lora_base_sha256"  # metadata of a LoRA file: the SHA-256 of the base checkpoint


class LoraAdapter(nn.Module):
    """One layer's ``A`` (``lora_down``) and ``B`` (``lora_up``) and its ``alpha / rank`` scale."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)  # nn.Linear's init is PEFT's A init
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_up.weight)
        self.alpha, self.scale = alpha, alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale


class LoraLinear(nn.Module):
    """A frozen linear layer plus its adapter."""

    def __init__(self, base: nn.Linear, adapter: LoraAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


class LoraAdapters(nn.ModuleDict):
    """Every adapter of a model under its kohya stem, so its state dict holds kohya keys."""

    def __init__(self, adapters: dict[str, LoraAdapter]):
        super().__init__({kohya_stem(name): adapter for name, adapter in adapters.items()})
        self.module_names = list(adapters)  # the DiT's module names, in the same order

    def pairs(self) -> dict[str, LoraPair]:
        """Module name -> its current update, in the form ``aaa_core.lora`` saves and merges."""
        return {
            name: LoraPair(a.lora_down.weight.detach(), a.lora_up.weight.detach(), a.alpha)
            for name, a in zip(self.module_names, self.values())
        }


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The linear layers named by ``targets``: a full name (``blocks.0.to_q``) or its end (``to_q``: every block's)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    names = []
    for target in targets:
        found = [name for name in linears if name == target or name.endswith("." + target)]
        if not found:
            raise InputError(
                f"--lora-targets: {target!r} names no linear layer of AAADiT; use the end of a name such as "
                "to_q, to_k, to_v, to_out, to_gate, ff.0, ff.2, proj_out, or a full name such as blocks.0.to_q"
            )
        names += [name for name in found if name not in names]
    return sorted(names, key=linears.index)


def add_adapters(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> LoraAdapters:
    """Freezes ``model`` and routes each targeted layer through a new adapter; returns the adapters."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    adapters = {}
    for name in target_names(model, targets):
        parent_name, _, child = name.rpartition(".")
        base = modules[name]
        adapters[name] = LoraAdapter(base, rank, alpha)
        setattr(modules[parent_name] if parent_name else model, child, LoraLinear(base, adapters[name]))
    return LoraAdapters(adapters)


class LoraRun:
    """What a LoRA run adds to full training: the adapters, the frozen base for samples, the file it saves."""

    def __init__(self, model: AAADiT, base_path: Path, base_sha256: str, rank: int, alpha: float, targets: Sequence[str],
                 keep_base: bool):
        alpha = alpha or float(rank)
        # The frozen base, for the samples: the adapted model is a copy of it with the adapters merged in.
        self.base = copy.deepcopy(model).eval().requires_grad_(False) if keep_base else None
        self.adapters = add_adapters(model, targets, rank, alpha)
        self.settings = {"rank": rank, "alpha": alpha, "targets": list(targets), "base_sha256": base_sha256}
        self.base_file = base_path.name
        self._base_grid: Image.Image | None = None
        count = sum(p.numel() for p in self.adapters.parameters())
        log.info("LoRA rank %d, alpha %g on %d layers (%s): %.2fM trainable parameters; base %s frozen",
                 rank, alpha, len(self.adapters), ", ".join(targets), count / 1e6, base_path)

    def sample_grid(self, render: Callable[[nn.Module], Image.Image | None], adapters: LoraAdapters) -> Image.Image | None:
        """The base model's grid beside the adapted one's (base left), same prompts and seeds; None if stopped.

        The adapted model is the base with the adapters merged in, as ComfyUI applies a LoRA. The
        base never changes, so its grid is rendered once.
        """
        adapted = copy.deepcopy(self.base)
        merge_lora(adapted, adapters.pairs(), 1.0)
        grid = render(adapted)
        if grid is not None and self._base_grid is None:
            self._base_grid = render(self.base)
        return side_by_side(self._base_grid, grid) if grid is not None and self._base_grid is not None else None

    def save(self, adapters: LoraAdapters, path: Path, step: int, weights: str, dtype: torch.dtype, run_id: str) -> Path:
        """Writes the adapters as a kohya-layout LoRA file, atomically, with what it was trained from in the metadata."""
        tensors = {k: v.to(dtype) for k, v in to_kohya(adapters.pairs()).items()}
        settings = self.settings
        metadata = {
            BASE_HASH_KEY: settings["base_sha256"], "aaa_lora_base_file": self.base_file,
            "aaa_lora_rank": str(settings["rank"]), "aaa_lora_alpha": str(settings["alpha"]),
            "aaa_lora_targets": json.dumps(settings["targets"]), "aaa_step": str(step), "aaa_weights": weights, "aaa_run_id": run_id,
        }
        save_safetensors(tensors, path, metadata)
        return path


def check_state_kind(progress: dict[str, Any], state: Path, settings: dict[str, Any] | None) -> None:
    """Refuses a LoRA state for a full run, a full state for a LoRA run, and LoRA states with other adapters or base.

    Adapters trained on another base, or of another shape, cannot continue: the error says which setting differs.
    """
    saved = progress.get("lora")
    if saved is not None and not isinstance(saved, dict):
        raise InputError(f"{state / 'progress.json'}: 'lora' holds {saved!r}, expected the LoRA settings or null; {DAMAGED}")
    if settings is None and saved is None:
        return
    if settings is None:
        raise InputError(f"state {state} is from a LoRA run (rank {saved.get('rank')}); resume it with the same --lora-rank, "
                         f"--lora-alpha, --lora-targets and --init-from")
    if saved is None:
        raise InputError(f"state {state} is from full training; resume it without --lora-rank, or start the LoRA run "
                         "in another --output-dir")
    changed = next((key for key in settings if saved.get(key) != settings[key]), None)
    if changed is None:
        return
    what = "a base checkpoint (--init-from) of SHA-256" if changed == "base_sha256" else f"LoRA {changed}"
    raise InputError(f"state {state} was trained with {what} {saved.get(changed)!r}, this run has {settings[changed]!r}; "
                     "resume with the same settings, or start afresh in another --output-dir")


def merge_lora_file(lora_path: Path, base_path: Path, strength: float = 1.0) -> AAADiT:
    """The base DiT (float32) with a LoRA file merged in at ``strength``; any layout ``aaa_core.lora`` reads."""
    model = load_dit(base_path, dtype=torch.float32)
    tensors, metadata = read_safetensors(lora_path)
    pairs = read_lora(tensors, linear_weight_shapes(model), lora_path)
    expected = metadata.get(BASE_HASH_KEY)
    if expected and expected != file_sha256(base_path):
        log.warning("%s was trained on another base (%s) than %s; merging anyway",
                    lora_path, metadata.get("aaa_lora_base_file", expected[:12]), base_path)
    merge_lora(model, pairs, strength)
    return model
