"""LoRA files for AAADiT: every supported key layout gives W + strength * alpha/rank * B @ A, and
files for another model are one-line errors. Runs AAA LoRA Loader in the ComfyUI imported
in-process: the LoRA becomes ComfyUI weight patches, applied when the MODEL is loaded.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_formats import FORMATS
from node_helpers import errors, one_line_error, use_model_dirs
from pack_import import node, pack_module
from tiny_models import TINY_DIT

from aaa_core.dit import AAADiT

lora = pack_module("aaa_core.lora")
load_patched = pack_module("nodes.native_model").load_patched

pytestmark = pytest.mark.usefixtures("model_folders")

RANK, ALPHA, STRENGTH = 2, 3.0, 0.5
TARGETS = ("blocks.0.to_q", "blocks.1.ff.0", "proj_out")


def factors(dit) -> dict:
    gen = torch.Generator().manual_seed(5)
    shapes = lora.parameter_shapes(dit)
    return {name: (torch.randn(RANK, shapes[f"{name}.weight"][1], generator=gen), torch.randn(shapes[f"{name}.weight"][0], RANK, generator=gen))
            for name in TARGETS}


def layout(pairs: dict, kind: str) -> dict:
    tensors = {}
    for name, (down, up) in pairs.items():
        if kind == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)})
        else:
            stem = {"peft": "", "peft_prefixed": "diffusion_model.", "peft_transformer": "transformer."}[kind] + name
            tensors.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": torch.tensor(ALPHA)})
    return tensors


@pytest.fixture
def loras_dir(tmp_path, monkeypatch):
    use_model_dirs(monkeypatch, {"loras": [tmp_path]})
    return tmp_path


@pytest.mark.parametrize("kind", ["peft", "peft_prefixed", "peft_transformer", "kohya"])
def test_every_layout_merges_the_hand_computed_update(models, loras_dir, kind):
    dit = models.dit.model.diffusion_model
    pairs = factors(dit)
    save_file(layout(pairs, kind), str(loras_dir / f"{kind}.safetensors"))
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    (patched,) = node("AAALoraLoader")(models.dit, f"{kind}.safetensors", STRENGTH)
    weights = {name: p.detach().clone() for name, p in load_patched(patched).named_parameters()}
    load_patched(models.dit)  # loading the unpatched MODEL takes the LoRA's patches off again
    for name, param in before.items():
        expected = param
        module = name[: -len(".weight")]
        if module in pairs:
            down, up = pairs[module]
            expected = param + STRENGTH * (ALPHA / RANK) * up @ down
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())  # the input model is unchanged


@pytest.mark.parametrize(
    "tensors, expected",
    [
        ({"blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64), "blocks.0.attn.qkv.lora_B.weight": torch.zeros(64, 2)},
         "bad.safetensors: LoRA key 'blocks.0.attn.qkv.lora_A.weight' names no layer of this AAADiT"),
        ({"blocks.0.to_q.lora_A.weight": torch.zeros(2, 3072), "blocks.0.to_q.lora_B.weight": torch.zeros(3072, 2)},
         "bad.safetensors: LoRA key 'blocks.0.to_q.lora_A.weight' holds (2, 3072) and (3072, 2), which does not fit blocks.0.to_q.weight (64, 64)"),
        ({"blocks.0.to_q.lora_A.weight": torch.zeros(2, 64)}, "key 'blocks.0.to_q.lora_A.weight' has no matching 'up' tensor"),
        ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)},
         "LoRA key 'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight' names no layer"),
        ({"blocks.0.to_q.weight": torch.zeros(64, 64)},  # a model checkpoint, not a LoRA
         "bad.safetensors: key 'blocks.0.to_q.weight' is not in a LoRA layout for AAADiT"),
    ],
)
def test_a_lora_for_another_model_is_a_one_line_error(models, loras_dir, tensors, expected):
    save_file(tensors, str(loras_dir / "bad.safetensors"))
    with pytest.raises(errors.ModelFileError) as excinfo:
        node("AAALoraLoader")(models.dit, "bad.safetensors", 1.0)
    assert expected in one_line_error(excinfo)


@pytest.mark.parametrize(
    "strength, alpha, expected",
    [
        (float("nan"), 3.0, "kohya.safetensors: LoRA strength nan is not a finite number"),
        (1e39, 3.0, "kohya.safetensors: LoRA strength 1e+39 is not a finite number"),
        (1.0, float("nan"), "kohya.safetensors: LoRA tensor 'lora_unet_blocks_0_to_q.alpha' holds NaN or infinite values"),
    ],
)
def test_the_node_checks_strength_and_values_and_names_the_lora(models, loras_dir, strength, alpha, expected):
    """Issue 16: a NaN strength or alpha is refused at the LoRA node, naming the LoRA file, not left to fail later."""
    tensors, _ = FORMATS["kohya"](lora.parameter_shapes(AAADiT(TINY_DIT)))
    tensors["lora_unet_blocks_0_to_q.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(loras_dir / "kohya.safetensors"))
    with pytest.raises((errors.InputError, errors.ModelFileError)) as excinfo:
        node("AAALoraLoader")(models.dit, "kohya.safetensors", strength)
    assert expected in one_line_error(excinfo)
