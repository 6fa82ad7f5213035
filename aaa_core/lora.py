"""LoRA files for AAADiT: the common key layouts read into one form, and merging into weights.

A LoRA stores, per linear layer ``W`` (out, in), a down matrix ``A`` (rank, in), an up matrix
``B`` (out, rank) and optionally ``alpha``; applied with ``strength`` it gives
``W + strength * scale * B @ A`` with ``scale = alpha / rank`` (1 without alpha). Layouts read:

- PEFT / diffusers: ``blocks.0.to_q.lora_A.weight`` and ``.lora_B.weight``, with or without a
  ``diffusion_model.``, ``transformer.`` or ``base_model.model.`` prefix, ``.alpha`` optional;
- kohya: ``lora_unet_blocks_0_to_q.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch

from .errors import ModelFileError

KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "")
# (down suffix, up suffix) per layout; alpha is always "<module>.alpha".
SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One layer's low-rank update."""

    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in float32."""
        return self.scale * (self.up.float() @ self.down.float())


def kohya_stem(name: str) -> str:
    """The kohya key stem of a module: ``blocks.0.to_q`` -> ``lora_unet_blocks_0_to_q``."""
    return KOHYA_PREFIX + name.replace(".", "_")


def read_lora(lora: Mapping[str, torch.Tensor], weight_shapes: Mapping[str, torch.Size], source: "str | os.PathLike[str]") -> dict[str, LoraPair]:
    """AAADiT module name (``blocks.0.to_q``) -> its update, from a LoRA in any layout above.

    ``weight_shapes`` maps each linear layer's module name to its weight shape. Every key must
    belong to a layer of this model and every pair must fit its layer, else a one-line
    ``ModelFileError`` names the file and the first key that does not.
    """
    kohya_names = {kohya_stem(name): name for name in weight_shapes}
    pairs: dict[str, LoraPair] = {}
    used: set[str] = set()
    for key in lora:
        for down_suffix, up_suffix in SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            stem = key[: -len(down_suffix)]
            name = kohya_names.get(stem) or next(
                (stem[len(p):] for p in PEFT_PREFIXES if stem.startswith(p) and stem[len(p):] in weight_shapes), None
            )
            if name is None:
                raise ModelFileError(f"{source}: LoRA key {key!r} names no linear layer of this AAADiT (e.g. blocks.0.to_q)")
            up_key, alpha_key = stem + up_suffix, stem + ".alpha"
            if up_key not in lora:
                raise ModelFileError(f"{source}: LoRA key {key!r} has no matching {up_key!r}")
            down, up = lora[key], lora[up_key]
            out_features, in_features = weight_shapes[name]
            if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
                raise ModelFileError(
                    f"{source}: LoRA for {name} is {tuple(up.shape)} @ {tuple(down.shape)}, but that layer's weight is "
                    f"({out_features}, {in_features}); the LoRA was made for another model"
                )
            alpha = float(lora[alpha_key]) if alpha_key in lora else None
            pairs[name] = LoraPair(down, up, alpha)
            used.update({key, up_key, alpha_key})
    leftover = sorted(set(lora) - used)
    if leftover or not pairs:
        what = f"key {leftover[0]!r} is" if leftover else "no keys are"
        raise ModelFileError(
            f"{source}: {what} not in a LoRA layout for AAADiT (PEFT 'blocks.N.to_q.lora_A.weight' or kohya "
            "'lora_unet_blocks_N_to_q.lora_down.weight')"
        )
    return pairs


def linear_weight_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Module name -> weight shape for every 2-D weight (the layers a LoRA can target)."""
    return {name[: -len(".weight")]: p.shape for name, p in model.named_parameters() if name.endswith(".weight") and p.ndim == 2}


def to_kohya(pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    """The same updates under kohya keys, the layout every ComfyUI release reads."""
    out: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        key = kohya_stem(name)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = pair.down, pair.up
        if pair.alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(pair.alpha)
    return out


def merge_lora(model: torch.nn.Module, pairs: Mapping[str, LoraPair], strength: float) -> None:
    """Adds ``strength * scale * B @ A`` to the weights in place (computed in float32)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in pairs.items():
            weight = modules[name].weight
            weight.copy_((weight.float() + strength * pair.delta().to(weight.device)).to(weight.dtype))
