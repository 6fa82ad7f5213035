"""LoRA files for AAADiT: every layout ComfyUI applies to this model, read into one form, and merging.

A file holds, per changed parameter, one of these updates (the maths of ComfyUI's
``comfy/weight_adapter``; ``strength`` multiplies each delta):

- LoRA: down ``A`` (rank, in), up ``B`` (out, rank), optional ``alpha``: ``alpha/rank * B @ A``;
- LoHa: ``hada_w1_a/b``, ``hada_w2_a/b``: ``alpha/rank * (w1_a @ w1_b) * (w2_a @ w2_b)``;
- LoKr: ``lokr_w1`` (or ``lokr_w1_a @ lokr_w1_b``), ``lokr_w2`` (or ``_a @ _b``): ``scale * kron(w1, w2)``,
  where ``scale = alpha/dim`` with ``dim`` the rank of the factorised one (``w2`` first), else 1;
- a full difference: ``.diff`` (or ``.w_norm``) for a weight, ``.diff_b`` (or ``.b_norm``) for its bias.

Key names: kohya ``lora_unet_blocks_0_to_q.<suffix>``, or the module name ``blocks.0.to_q.<suffix>``
bare or after ``diffusion_model.`` (ComfyUI's TrainLoraNode/SaveLoRA), ``transformer.`` or
``base_model.model.`` (PEFT/diffusers). Low-rank suffixes are kohya's ``lora_down/lora_up.weight``,
PEFT's ``lora_A/lora_B.weight`` and the other spellings ComfyUI reads. Every key must land on a
parameter of the model with a fitting shape, and every value must be finite, else one
``ModelFileError`` line names the file and the key. Files are read into ``{parameter name:
update}``; ``comfy_tensors`` writes them back under the keys every ComfyUI release maps for AAADiT.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import torch

from .errors import InputError, ModelFileError

KOHYA_PREFIX = "lora_unet_"
PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "")
NATIVE_PREFIX = "diffusion_model."  # ComfyUI's name for the DiT's parameters, for those without a kohya name

# Key suffix -> the role of its tensor. Low-rank spellings as in ComfyUI's weight_adapter/lora.py.
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya, ComfyUI SaveLoRA
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT / diffusers
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_A": "down", ".lora_B": "up",
    ".alpha": "alpha",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b",
    ".diff": "diff", ".w_norm": "diff", ".diff_b": "diff_b", ".b_norm": "diff_b",
}
# Layouts ComfyUI reads that AAA LoRA Loader refuses, and why.
REFUSED = {
    ".dora_scale": "DoRA (weight-decomposed) LoRAs are not supported by AAA LoRA Loader; apply it with "
                   "LoraLoaderModelOnly of a current ComfyUI",
    ".lora_mid.weight": "Tucker factors are for convolutions, and AAADiT has none",
    ".hada_t1": "Tucker factors are for convolutions, and AAADiT has none",
    ".lokr_t2": "Tucker factors are for convolutions, and AAADiT has none",
    ".oft_blocks": "OFT/BOFT adapters are not supported",
    ".a1.weight": "GLoRA adapters are not supported",
    ".set_weight": "weight replacement ('set_weight') is not supported",
}
_SUFFIXES = sorted([*ROLES, *REFUSED], key=len, reverse=True)  # the longest match wins (".diff_b" over ".diff")
LAYOUTS = ("kohya 'lora_unet_blocks_N_to_q.lora_down.weight', PEFT 'blocks.N.to_q.lora_A.weight', "
           "LoHa 'hada_w1_a', LoKr 'lokr_w1' or full diffs '.diff'/'.diff_b'")


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """A low-rank update: ``alpha/rank * up @ down``."""

    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())

    def factors(self) -> list[torch.Tensor]:
        return [self.down, self.up]

    def shape(self) -> tuple[int, ...] | None:
        """The shape of the delta, None if the factors do not multiply."""
        return _product_shape(self.up, self.down)

    def suffixed(self) -> dict[str, torch.Tensor]:
        return {".lora_down.weight": self.down, ".lora_up.weight": self.up, **_alpha_entry(self.alpha)}


@dataclasses.dataclass(frozen=True)
class LoHa:
    """A Hadamard product of two low-rank products."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None

    def delta(self) -> torch.Tensor:
        scale = 1.0 if self.alpha is None else self.alpha / self.w1_b.shape[0]
        return scale * (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())

    def factors(self) -> list[torch.Tensor]:
        return [self.w1_a, self.w1_b, self.w2_a, self.w2_b]

    def shape(self) -> tuple[int, ...] | None:
        first, second = _product_shape(self.w1_a, self.w1_b), _product_shape(self.w2_a, self.w2_b)
        return first if first == second else None

    def suffixed(self) -> dict[str, torch.Tensor]:
        names = ("w1_a", "w1_b", "w2_a", "w2_b")
        return {**{f".hada_{n}": getattr(self, n) for n in names}, **_alpha_entry(self.alpha)}


@dataclasses.dataclass(frozen=True)
class LoKr:
    """A Kronecker product; each factor whole or as a low-rank product (tensors by LyCORIS role name)."""

    factors_by_role: dict[str, torch.Tensor]
    alpha: float | None

    def _factor(self, n: int) -> torch.Tensor:
        whole = self.factors_by_role.get(f"lokr_w{n}")
        if whole is not None:
            return whole.float()
        return self.factors_by_role[f"lokr_w{n}_a"].float() @ self.factors_by_role[f"lokr_w{n}_b"].float()

    def delta(self) -> torch.Tensor:
        low_rank = [f"lokr_w{n}_b" for n in (2, 1) if f"lokr_w{n}" not in self.factors_by_role]  # w2's rank first, as ComfyUI
        scale = self.alpha / self.factors_by_role[low_rank[0]].shape[0] if self.alpha is not None and low_rank else 1.0
        return scale * torch.kron(self._factor(1), self._factor(2))

    def factors(self) -> list[torch.Tensor]:
        return list(self.factors_by_role.values())

    def shape(self) -> tuple[int, ...] | None:
        sides = []
        for n in (1, 2):
            whole, a, b = (self.factors_by_role.get(f"lokr_w{n}{s}") for s in ("", "_a", "_b"))
            sides.append(tuple(whole.shape) if whole is not None and whole.ndim == 2 else _product_shape(a, b) if whole is None else None)
        return None if None in sides else (sides[0][0] * sides[1][0], sides[0][1] * sides[1][1])

    def suffixed(self) -> dict[str, torch.Tensor]:
        return {**{f".{role}": t for role, t in self.factors_by_role.items()}, **_alpha_entry(self.alpha)}


@dataclasses.dataclass(frozen=True)
class Diff:
    """A full difference added to the parameter."""

    diff: torch.Tensor

    def delta(self) -> torch.Tensor:
        return self.diff.float()

    def factors(self) -> list[torch.Tensor]:
        return [self.diff]

    def shape(self) -> tuple[int, ...] | None:
        return tuple(self.diff.shape)

    def suffixed(self) -> dict[str, torch.Tensor]:
        return {".diff": self.diff}


Update = LoraPair | LoHa | LoKr | Diff


def _alpha_entry(alpha: float | None) -> dict[str, torch.Tensor]:
    return {} if alpha is None else {".alpha": torch.tensor(alpha)}


def _product_shape(left: torch.Tensor, right: torch.Tensor) -> tuple[int, int] | None:
    """The shape of ``left @ right`` for matrices, None if they do not multiply."""
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        return None
    return left.shape[0], right.shape[1]


def kohya_stem(name: str) -> str:
    """The kohya key stem of a module: ``blocks.0.to_q`` -> ``lora_unet_blocks_0_to_q``."""
    return KOHYA_PREFIX + name.replace(".", "_")


def parameter_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter name -> shape: what a LoRA file can change."""
    return {name: p.shape for name, p in model.named_parameters()}


def check_strength(strength: object, source: "str | os.PathLike[str]") -> float:
    """``strength`` as a float if it is finite in float32 (the dtype deltas are computed in), else a one-line error."""
    value = float(strength) if isinstance(strength, (int, float)) and not isinstance(strength, bool) else math.nan
    if not math.isfinite(value) or abs(value) > torch.finfo(torch.float32).max:
        raise InputError(f"{source}: LoRA strength {strength!r} is not a finite number; use a value such as 1.0")
    return value


def read_lora(lora: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], source: "str | os.PathLike[str]") -> dict[str, Update]:
    """Parameter name (``blocks.0.to_q.weight``) -> its update, from a LoRA file in any layout above.

    ``shapes`` is ``parameter_shapes`` of the model. A key that names no parameter, a refused
    layout, a shape that does not fit, a rank of 0, an alpha that is not one finite number or a
    tensor that is not finite is a one-line ``ModelFileError`` naming ``source`` and the key.
    """
    stems: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in lora.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ModelFileError(f"{source}: key {key!r} is not in a LoRA layout for AAADiT ({LAYOUTS})")
        if suffix in REFUSED:
            raise ModelFileError(f"{source}: key {key!r}: {REFUSED[suffix]}")
        _check_values(key, tensor, source)
        roles = stems.setdefault(key[: -len(suffix)], {})
        if ROLES[suffix] in roles:
            raise ModelFileError(f"{source}: keys {roles[ROLES[suffix]][0]!r} and {key!r} give the same layer twice")
        roles[ROLES[suffix]] = (key, tensor)
    kohya_names = {kohya_stem(name[: -len(".weight")]): name[: -len(".weight")] for name in shapes if name.endswith(".weight")}
    updates: dict[str, Update] = {}
    for stem, roles in stems.items():
        module = kohya_names.get(stem) or next(
            (stem[len(p):] for p in PREFIXES if stem.startswith(p) and _targets(stem[len(p):], shapes)), None)
        if module is None:
            key = next(iter(roles.values()))[0]
            raise ModelFileError(f"{source}: LoRA key {key!r} names no layer of this AAADiT (e.g. blocks.0.to_q)")
        for param, update, key in _updates(module, roles, shapes, source):
            if param in updates:
                raise ModelFileError(f"{source}: key {key!r} changes {param}, which another key of the file changes too")
            _check_shape(update, shapes[param], param, key, source)
            updates[param] = update
    if not updates:
        raise ModelFileError(f"{source}: no keys are in a LoRA layout for AAADiT ({LAYOUTS})")
    return updates


def _targets(module: str, shapes: Mapping[str, torch.Size]) -> bool:
    return f"{module}.weight" in shapes or module in shapes


def _check_values(key: str, tensor: torch.Tensor, source: object) -> None:
    if not tensor.is_floating_point():
        raise ModelFileError(f"{source}: LoRA tensor {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values, expected floats")
    if key.endswith(".alpha") and tensor.numel() != 1:
        raise ModelFileError(f"{source}: LoRA alpha {key!r} holds {tensor.numel()} values (shape {tuple(tensor.shape)}), expected one number")
    if not bool(torch.isfinite(tensor).all()):
        raise ModelFileError(f"{source}: LoRA tensor {key!r} holds NaN or infinite values; the file is damaged or from a diverged run")


def _updates(module: str, roles: dict[str, tuple[str, torch.Tensor]], shapes: Mapping[str, torch.Size], source: object):
    """(parameter, update, a key of it) for each update one key stem holds."""
    tensors = {role: tensor for role, (_, tensor) in roles.items()}
    first_key = next(iter(roles.values()))[0]
    weight = f"{module}.weight" if f"{module}.weight" in shapes else module
    alpha = float(tensors.pop("alpha")) if "alpha" in tensors else None
    bias_diff = tensors.pop("diff_b", None)
    if bias_diff is not None:
        if f"{module}.bias" not in shapes:
            raise ModelFileError(f"{source}: key {roles['diff_b'][0]!r}: {module} has no bias")
        yield f"{module}.bias", Diff(bias_diff), roles["diff_b"][0]
    families = {role.split("_")[0] if role.startswith(("hada", "lokr")) else "lora" if role in ("down", "up") else role for role in tensors}
    if len(families) > 1:
        raise ModelFileError(f"{source}: key {first_key!r}: one layer holds several kinds of update ({', '.join(sorted(families))})")
    if not families:
        if alpha is not None and bias_diff is None:
            raise ModelFileError(f"{source}: key {roles['alpha'][0]!r} is an alpha with no LoRA matrices beside it")
        return
    (family,) = families
    needed = {"lora": ("down", "up"), "hada": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "diff": ("diff",),
              "lokr": ("lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a", "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_b",
                       "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a", "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_b")}[family]
    missing = [role for role in needed if role not in tensors]
    main_key = next(roles[role][0] for role in (*needed, *tensors) if role in roles)  # the key errors name
    if missing:
        raise ModelFileError(f"{source}: key {main_key!r} has no matching {missing[0]!r} tensor beside it")
    if family == "lora":
        update: Update = LoraPair(tensors["down"], tensors["up"], alpha)
    elif family == "hada":
        update = LoHa(tensors["hada_w1_a"], tensors["hada_w1_b"], tensors["hada_w2_a"], tensors["hada_w2_b"], alpha)
    elif family == "lokr":
        update = LoKr(tensors, alpha)
    else:
        update = Diff(tensors["diff"])
    yield weight, update, main_key


def _check_shape(update: Update, shape: torch.Size, param: str, key: str, source: object) -> None:
    """Refuses a rank of 0 and factors whose product does not have the parameter's shape."""
    factors = update.factors()
    stored = " and ".join(str(tuple(t.shape)) for t in factors)
    if not isinstance(update, Diff) and any(0 in t.shape for t in factors):
        raise ModelFileError(f"{source}: LoRA key {key!r} has rank 0 ({stored}); the file is empty or damaged")
    if update.shape() != tuple(shape):
        raise ModelFileError(f"{source}: LoRA key {key!r} holds {stored}, which does not fit {param} {tuple(shape)}; "
                             "the LoRA was made for another model")


def comfy_tensors(updates: Mapping[str, Update]) -> dict[str, torch.Tensor]:
    """The updates under the keys every ComfyUI release maps for AAADiT: kohya stems for weights and biases.

    Biases take ``.diff_b`` on their module's stem; parameters with no ``.weight``/``.bias`` name keep
    ComfyUI's native name (``diffusion_model.pos_embedder.image_emb.diff``, read by current ComfyUI only).
    """
    tensors: dict[str, torch.Tensor] = {}
    for param, update in updates.items():
        module, _, leaf = param.rpartition(".")
        stem = kohya_stem(module) if leaf in ("weight", "bias") else NATIVE_PREFIX + param
        for suffix, tensor in update.suffixed().items():
            tensors[stem + (".diff_b" if leaf == "bias" else suffix)] = tensor
    return tensors


def to_kohya(pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    """Low-rank updates by module name (``blocks.0.to_q``) under kohya keys, as our trainer saves them."""
    return comfy_tensors({f"{name}.weight": pair for name, pair in pairs.items()})


def merge_lora(model: torch.nn.Module, updates: Mapping[str, Update], strength: float, source: "str | os.PathLike[str]" = "LoRA") -> None:
    """Adds ``strength * delta`` to each parameter in place (computed in float32), refusing a non-finite result."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, update in updates.items():
            param = params[name]
            merged = param.float() + strength * update.delta().reshape(param.shape).to(param.device)
            if not bool(torch.isfinite(merged.to(param.dtype)).all()):
                raise InputError(f"{source}: merging it at strength {strength:g} makes {name} overflow; use a smaller strength")
            param.copy_(merged.to(param.dtype))
