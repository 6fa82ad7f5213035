"""The native pieces called directly: the flow-matching model sampling, the network's calling
convention, and the reference noise and sigmas nodes, against ``aaa_core``'s own numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from node_helpers import errors, one_line_error
from pack_import import node, pack_module

native_dit = pack_module("nodes.native_dit")
core_sampling = pack_module("aaa_core.sampling")
scheduler = pack_module("aaa_core.scheduler")

pytestmark = pytest.mark.usefixtures("model_folders")


def test_model_sampling_follows_the_flux2_curve_and_rectified_flow() -> None:
    sampling = native_dit.FlowMatchingSampling()
    mu = native_dit.DEFAULT_MU
    assert math.isclose(mu, scheduler.empirical_mu(256, 30))
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(sampling.sigma(t * 1000), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    assert sampling.timestep(torch.tensor(0.25)) == 250.0  # the network sees 1000 * sigma
    assert float(sampling.sigma_max) == 1.0 and 0 < float(sampling.sigma_min) < 0.01
    assert sampling.percent_to_sigma(0.0) == 1.0 and sampling.percent_to_sigma(1.0) == 0.0
    x0, noise, sigma = torch.randn(2, 128, 2, 2), torch.randn(2, 128, 2, 2), torch.tensor([0.3, 0.8])
    noisy = sampling.noise_scaling(sigma, noise, x0)
    torch.testing.assert_close(noisy, core_sampling.noise_latents(x0, noise, sigma.view(2, 1, 1, 1)))
    # The network predicts v = noise - x0, so denoising the exact velocity gives x0 back.
    torch.testing.assert_close(sampling.calculate_denoised(sigma, noise - x0, noisy), x0)


def test_network_takes_comfyuis_argument_order_and_rounds_the_timestep_like_the_reference(models) -> None:
    dit = models.dit.model.diffusion_model
    latents, embeds = torch.randn(1, 128, 2, 3), torch.randn(1, 5, dit.config.text_dim)
    timestep = torch.tensor([123.456])
    expected = super(native_dit.ComfyAAADiT, dit).forward(latents, embeds, timestep.to(latents.dtype))
    torch.testing.assert_close(dit(latents, timestep, context=embeds, transformer_options={}), expected)
    torch.testing.assert_close(dit.velocity(latents, embeds, timestep), expected)
    with pytest.raises(errors.InputError) as excinfo:
        dit(latents, timestep)
    assert "AAADiT got no prompt embedding" in one_line_error(excinfo)
    with pytest.raises(errors.InputError) as excinfo:  # e.g. an SD latent from a native Empty Latent Image
        dit(torch.randn(1, 4, 8, 8), timestep, context=embeds)
    assert one_line_error(excinfo).startswith(
        "latent_image holds (1, 4, 8, 8), but this AAADiT takes (batch, 128, H/16, W/16) FLUX.2 latents"
    )


def test_flux2_sigmas_node_gives_aaa_samplers_schedule_ending_at_zero() -> None:
    (sigmas,) = node("AAAFlux2Sigmas")(steps=30, width=256, height=256, denoise=1.0)
    torch.testing.assert_close(sigmas[:-1], scheduler.flux2_sigmas(30, 1.0, image_seq_len=256), rtol=0, atol=0)
    assert sigmas[-1] == 0 and sigmas.shape == (31,)
    (partial,) = node("AAAFlux2Sigmas")(steps=10, width=64, height=48, denoise=0.6)
    torch.testing.assert_close(partial[:-1], scheduler.flux2_sigmas(10, 0.6, image_seq_len=12), rtol=0, atol=0)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAFlux2Sigmas")(steps=30, width=250, height=256, denoise=1.0)
    assert "width 250 is not a positive multiple of 16; try 256" in one_line_error(excinfo)


def test_reference_noise_gives_image_i_seed_plus_i_and_keeps_batch_index() -> None:
    (noise,) = node("AAAReferenceNoise")(noise_seed=7)
    assert noise.seed == 7
    latent = {"samples": torch.zeros(3, 128, 2, 4)}
    drawn = noise.generate_noise(latent)
    for i in range(3):
        torch.testing.assert_close(drawn[i : i + 1], core_sampling.make_noise(7 + i, 1, 2, 4), rtol=0, atol=0)
    picked = noise.generate_noise({"samples": torch.zeros(1, 128, 2, 4), "batch_index": [2]})
    torch.testing.assert_close(picked, drawn[2:3], rtol=0, atol=0)
    with pytest.raises(errors.InputError) as excinfo:
        noise.generate_noise({"samples": torch.zeros(1, 4, 8, 8)})
    assert "latent_image has 4 channels" in one_line_error(excinfo)


def test_aaa_sampler_refuses_a_model_that_is_not_an_aaadit(prompts) -> None:
    """A native MODEL of another family (here: its network is a plain Linear) is a one-line error."""
    other = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(other, *prompts, latent, seed=0, steps=2, cfg=4.0, denoise=1.0)
    assert one_line_error(excinfo) == "model holds a Linear, not an AAADiT; load it with AAA DiT Loader"
