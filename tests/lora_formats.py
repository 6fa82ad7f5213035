"""LoRA files in every layout ComfyUI applies to AAADiT, with real key names, and the change each should make.

Each writer takes the tiny DiT's parameter shapes and returns the file's tensors and, per parameter,
the delta at strength 1 computed here by the formula of ComfyUI's ``comfy/weight_adapter`` (LoRA,
LoHa, LoKr) or ``comfy/lora.py`` (``diff``, ``diff_b``), so a test can check a merge against it.
"""

from __future__ import annotations

from typing import Callable

import torch

RANK, ALPHA = 2, 3.0
LINEARS = ("blocks.0.to_q", "blocks.1.ff.0", "proj_out")  # attention, MLP and output layers

Written = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.3


def kohya_stem(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def low_rank(stem_of: Callable[[str], str], down: str, up: str, alpha: bool = True, seed: int = 1) -> Callable[[dict], Written]:
    """LoRA pairs under ``stem_of(module) + down/up`` suffixes, with ``.alpha`` or without (scale 1)."""

    def write(shapes: dict) -> Written:
        gen, tensors, deltas = _gen(seed), {}, {}
        for module in LINEARS:
            out_features, in_features = shapes[f"{module}.weight"]
            a, b = _randn(gen, RANK, in_features), _randn(gen, out_features, RANK)
            stem = stem_of(module)
            tensors.update({stem + down: a, stem + up: b})
            if alpha:
                tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
            deltas[f"{module}.weight"] = (ALPHA / RANK if alpha else 1.0) * b @ a
        return tensors, deltas

    return write


def comfy_trained(shapes: dict) -> Written:
    """As ComfyUI's TrainLoraNode/SaveLoRA writes: LoRA pairs (alpha 1) on 2-D weights, ``.diff`` on 1-D
    weights, ``.diff_b`` on biases, under ``diffusion_model.<module>``."""
    gen, tensors, deltas = _gen(2), {}, {}
    for module in (*LINEARS, "image_embedder.1"):
        stem = f"diffusion_model.{module}"
        weight = shapes[f"{module}.weight"]
        if len(weight) == 2:
            up, down = _randn(gen, weight[0], RANK), _randn(gen, RANK, weight[1])
            tensors.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": torch.tensor(1.0)})
            deltas[f"{module}.weight"] = (1.0 / RANK) * up @ down
        else:
            tensors[f"{stem}.diff"] = deltas[f"{module}.weight"] = _randn(gen, *weight)
        tensors[f"{stem}.diff_b"] = deltas[f"{module}.bias"] = _randn(gen, *shapes[f"{module}.bias"])
    return tensors, deltas


def loha(shapes: dict) -> Written:
    gen, tensors, deltas = _gen(3), {}, {}
    for module in LINEARS:
        out_features, in_features = shapes[f"{module}.weight"]
        w1a, w1b, w2a, w2b = _randn(gen, out_features, RANK), _randn(gen, RANK, in_features), _randn(gen, out_features, RANK), _randn(gen, RANK, in_features)
        stem = kohya_stem(module)
        tensors.update({f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b, f"{stem}.hada_w2_a": w2a, f"{stem}.hada_w2_b": w2b,
                        f"{stem}.alpha": torch.tensor(ALPHA)})
        deltas[f"{module}.weight"] = (ALPHA / RANK) * (w1a @ w1b) * (w2a @ w2b)
    return tensors, deltas


def lokr(shapes: dict) -> Written:
    """LoKr with a whole ``w1`` and a factorised ``w2`` (scale alpha / rank of w2), and the other way round."""
    gen, tensors, deltas = _gen(4), {}, {}
    for index, module in enumerate(LINEARS):
        out_features, in_features = shapes[f"{module}.weight"]
        w1 = _randn(gen, 2, 4)  # the Kronecker factors: (2, 4) x (out/2, in/4)
        a, b = _randn(gen, out_features // 2, RANK), _randn(gen, RANK, in_features // 4)
        stem = kohya_stem(module)
        if index % 2 == 0:
            tensors.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": a, f"{stem}.lokr_w2_b": b})
        else:
            w1a, w1b = _randn(gen, 2, 1), _randn(gen, 1, 4)  # w1 factorised with rank 1, w2 whole
            w1 = w1a @ w1b
            tensors.update({f"{stem}.lokr_w1_a": w1a, f"{stem}.lokr_w1_b": w1b, f"{stem}.lokr_w2": a @ b})
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
        deltas[f"{module}.weight"] = (ALPHA / (RANK if index % 2 == 0 else 1)) * torch.kron(w1, a @ b)
    return tensors, deltas


def full_diffs(shapes: dict) -> Written:
    """Whole weight and bias differences under kohya stems."""
    gen, tensors, deltas = _gen(5), {}, {}
    for module in LINEARS:
        stem = kohya_stem(module)
        tensors[f"{stem}.diff"] = deltas[f"{module}.weight"] = _randn(gen, *shapes[f"{module}.weight"])
        tensors[f"{stem}.diff_b"] = deltas[f"{module}.bias"] = _randn(gen, *shapes[f"{module}.bias"])
    return tensors, deltas


FORMATS: dict[str, Callable[[dict], Written]] = {
    "kohya": low_rank(kohya_stem, ".lora_down.weight", ".lora_up.weight"),
    "peft": low_rank(lambda m: m, ".lora_A.weight", ".lora_B.weight", alpha=False),
    "peft_diffusion_model": low_rank(lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),
    "peft_transformer": low_rank(lambda m: f"transformer.{m}", ".lora_A.weight", ".lora_B.weight"),
    "peft_base_model": low_rank(lambda m: f"base_model.model.{m}", ".lora_A.weight", ".lora_B.weight", alpha=False),
    "comfy_trained": comfy_trained,
    "loha": loha,
    "lokr": lokr,
    "full_diffs": full_diffs,
}
# Layouts the 2024 ComfyUI tree's LoraLoaderModelOnly maps for AAADiT (kohya stems only); 0.10 maps these
# and the ``diffusion_model.`` ones. Bare, ``transformer.`` and ``base_model.model.`` names only our loader reads.
COMFY_2024 = ("kohya", "loha", "lokr", "full_diffs")
COMFY_CURRENT = (*COMFY_2024, "peft_diffusion_model", "comfy_trained")
