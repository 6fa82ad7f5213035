"""The shared checks under the CLI and the nodes: non-finite results and out-of-memory errors."""

from __future__ import annotations

import logging

import pytest
import torch

from aaa_core.errors import ComputeError
from aaa_core.guards import is_out_of_memory, out_of_memory_as_error, require_finite
from aaa_core.pipeline import decode_latents
from aaa_core.vae import load_vae
from tiny_models import save_tiny_dit, save_tiny_vae
from training.sample_grids import render_grid

NAN_AND_INF = torch.tensor([1.0, float("nan"), float("inf"), 2.0])


@pytest.mark.parametrize(
    "dtype, cfg, cause",
    [
        (torch.float16, 10.0, "float16 overflow: use bfloat16 or float32"),
        (torch.bfloat16, 80.0, "cfg 80.0 is too large: use a value between 1 and 15"),
        (torch.float32, 10.0, "the model weights may hold NaN/inf (a corrupt or diverged checkpoint): try another file"),
    ],
)
def test_non_finite_results_name_their_likely_cause(dtype, cfg, cause):
    with pytest.raises(ComputeError) as excinfo:
        require_finite(NAN_AND_INF.to(dtype), "sampled latents", dtype, cfg)
    assert str(excinfo.value) == f"sampled latents hold 2 NaN/inf values out of 4: {cause}"
    finite = torch.ones(3)
    assert require_finite(finite, "x", dtype, cfg) is finite


def test_decoded_images_with_nan_are_refused(tmp_path):
    vae = load_vae(save_tiny_vae(tmp_path / "vae.safetensors"))
    assert torch.isfinite(decode_latents(vae, torch.zeros(1, 128, 1, 1))).all()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(ComputeError, match="^decoded images hold 256 NaN/inf values out of 768: the model weights may hold NaN/inf"):
        decode_latents(vae, torch.zeros(1, 128, 1, 1))


def test_training_sample_grid_that_overflows_is_skipped_with_a_warning(tmp_path, caplog):
    from aaa_core.dit import load_dit

    dit = load_dit(save_tiny_dit(tmp_path / "dit.safetensors"))
    vae = load_vae(save_tiny_vae(tmp_path / "vae.safetensors"))
    prompts, negative = torch.randn(2, 8, 32), torch.randn(8, 32)
    assert render_grid(dit, vae, prompts, negative, resolution=16, steps=1, cfg=4.0, seed=0).size == (32, 16)
    with caplog.at_level(logging.WARNING):
        assert render_grid(dit, vae, prompts, negative, resolution=16, steps=2, cfg=1e38, seed=0) is None
    assert "no sample grid this time: sampled latents hold" in caplog.text and "cfg 1e+38 is too large" in caplog.text


def test_decoding_latents_far_out_of_range_names_them_as_the_cause(tmp_path):
    """One Euler step at a huge cfg gives finite latents near 1e38: the VAE, not the sampler, overflows."""
    vae = load_vae(save_tiny_vae(tmp_path / "vae.safetensors"))
    with pytest.raises(ComputeError) as excinfo:
        decode_latents(vae, torch.full((1, 128, 1, 1), 3e38))
    assert str(excinfo.value).startswith("decoded images hold ")
    assert str(excinfo.value).endswith(
        ": its input latents reach 3e+38, far outside their usual range (made with too large a cfg, or by a broken model?)"
    )


@pytest.mark.parametrize(
    "error, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    ],
)
def test_out_of_memory_is_recognised_in_all_its_forms(error, expected):
    assert is_out_of_memory(error) is expected
    raised = ComputeError if expected else type(error)
    with pytest.raises(raised) as excinfo, out_of_memory_as_error("sampling", "reduce the batch"):
        raise error
    if expected:
        assert str(excinfo.value) == "out of memory while sampling: reduce the batch"
