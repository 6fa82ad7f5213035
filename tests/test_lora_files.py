"""LoRA files through the library: every layout ComfyUI applies, merged by ``python -m training.export``,
changes each parameter by strength * the formula's delta; bad keys, shapes and values are one-line
errors that name the LoRA file (never the base) and write nothing.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_formats import FORMATS, LINEARS, RANK
from tiny_models import TINY_DIT, save_tiny_dit

from aaa_core.dit import AAADiT
from aaa_core.lora import parameter_shapes, read_lora
from training import export

STRENGTH = 0.7
SHAPES = parameter_shapes(AAADiT(TINY_DIT))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_dit(tmp_path_factory.mktemp("lora_base") / "base.safetensors")


@pytest.mark.parametrize("layout", list(FORMATS))
def test_export_merges_every_layout_by_its_formula(base, tmp_path, layout):
    tensors, deltas = FORMATS[layout](SHAPES)
    lora_file, merged_file = tmp_path / f"{layout}.safetensors", tmp_path / "merged.safetensors"
    save_file(tensors, str(lora_file))
    assert export.main([str(lora_file), str(merged_file), "--base", str(base), "--strength", str(STRENGTH), "--dtype", "fp32"]) == 0
    before, after = load_file(str(base)), load_file(str(merged_file))
    assert set(deltas) and set(after) == set(before)
    for name, weight in before.items():
        expected = weight + STRENGTH * deltas[name] if name in deltas else weight
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-5)


def lora_with(**changes) -> dict:
    """The kohya test file with some tensors replaced (None removes one)."""
    tensors, _ = FORMATS["kohya"](SHAPES)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


Q = "lora_unet_blocks_0_to_q"


@pytest.mark.parametrize(
    "tensors, expected",
    [
        # issue 16: values checked like the DiT's
        (lora_with(**{f"{Q}__alpha": torch.tensor(float("nan"))}), f"LoRA tensor '{Q}.alpha' holds NaN or infinite values"),
        (lora_with(**{f"{Q}__lora_up__weight": torch.full((64, RANK), float("inf"))}), f"LoRA tensor '{Q}.lora_up.weight' holds NaN or infinite"),
        (lora_with(**{f"{Q}__lora_down__weight": torch.zeros(0, 64), f"{Q}__lora_up__weight": torch.zeros(64, 0)}), f"LoRA key '{Q}.lora_down.weight' has rank 0"),
        (lora_with(**{f"{Q}__alpha": torch.tensor([1.0, 2.0])}), f"LoRA alpha '{Q}.alpha' holds 2 values (shape (2,)), expected one number"),
        (lora_with(**{f"{Q}__lora_up__weight": torch.ones(64, RANK, dtype=torch.int32)}), "holds int32 values, expected floats"),
        # the strict check: every key lands on a parameter, with a fitting shape
        (lora_with(**{"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.zeros(2, 64)}), "LoRA key 'lora_unet_blocks_0_attn_qkv.lora_down.weight' names no layer"),
        (lora_with(**{f"{Q}__lora_up__weight": torch.zeros(3072, RANK)}), f"LoRA key '{Q}.lora_down.weight' holds (2, 64) and (3072, 2), which does not fit blocks.0.to_q.weight (64, 64)"),
        (lora_with(**{f"{Q}__lora_up__weight": None}), f"key '{Q}.lora_down.weight' has no matching 'up' tensor"),
        (lora_with(**{f"{Q}__diff_b": torch.zeros(65)}), f"LoRA key '{Q}.diff_b' holds (65,), which does not fit blocks.0.to_q.bias (64,)"),
        (lora_with(**{"lora_unet_blocks_0_norm_attn.diff_b": torch.zeros(64)}), "names no layer"),
        (lora_with(**{f"{Q}__dora_scale": torch.ones(64, 1)}), f"key '{Q}.dora_scale': DoRA (weight-decomposed) LoRAs are not supported"),
        (lora_with(**{"blocks.0.to_q.lora_A.weight": torch.zeros(2, 64), "blocks.0.to_q.lora_B.weight": torch.zeros(64, 2)}), "changes blocks.0.to_q.weight, which another key of the file changes too"),
        (lora_with(**{"blocks.0.to_q.weight": torch.zeros(64, 64)}), "key 'blocks.0.to_q.weight' is not in a LoRA layout for AAADiT"),
        (lora_with(**{f"{Q}__hada_w1_a": torch.zeros(64, 2)}), "one layer holds several kinds of update (hada, lora)"),
    ],
)
def test_bad_lora_files_are_one_line_errors_naming_the_file(base, tmp_path, caplog, tensors, expected):
    lora_file, out = tmp_path / "bad_lora.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(lora_file))
    with caplog.at_level(logging.ERROR):
        assert export.main([str(lora_file), str(out), "--base", str(base)]) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith(f"{lora_file}: ") and expected in line and "\n" not in line and str(base) not in line
    assert not out.exists()


@pytest.mark.parametrize("strength", ["nan", "inf", "1e39", "-1e39"])
def test_export_refuses_a_strength_that_is_not_finite(base, tmp_path, caplog, strength):
    lora_file, out = tmp_path / "lora.safetensors", tmp_path / "out.safetensors"
    save_file(lora_with(), str(lora_file))
    with caplog.at_level(logging.ERROR):
        assert export.main([str(lora_file), str(out), "--base", str(base), f"--strength={strength}"]) == 1
    assert f"{lora_file}: LoRA strength {float(strength)!r} is not a finite number" in caplog.text and not out.exists()


def test_a_merge_that_overflows_names_the_lora_and_writes_nothing(base, tmp_path, caplog):
    lora_file, out = tmp_path / "lora.safetensors", tmp_path / "out.safetensors"
    save_file(lora_with(**{f"{Q}__lora_up__weight": torch.full((64, RANK), 1e30)}), str(lora_file))
    with caplog.at_level(logging.ERROR):
        assert export.main([str(lora_file), str(out), "--base", str(base), "--strength", "1e10"]) == 1
    assert f"{lora_file}: merging it at strength 1e+10 makes blocks.0.to_q.weight overflow" in caplog.text and not out.exists()


def test_every_layout_reads_into_one_update_per_parameter():
    for layout, write in FORMATS.items():
        tensors, deltas = write(SHAPES)
        updates = read_lora(tensors, SHAPES, f"{layout}.safetensors")
        assert set(updates) == set(deltas), layout
        for name, delta in deltas.items():
            torch.testing.assert_close(updates[name].delta(), delta, rtol=1e-6, atol=1e-6)
    assert {f"{m}.weight" for m in LINEARS} <= set(read_lora(FORMATS["comfy_trained"](SHAPES)[0], SHAPES, "x"))
