"""Tests for aaa_core.vae: FLUX.2 file keys, parity with diffusers and DiffSynth, loading, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from aaa_core.dit import AAADiT, AAADiTConfig
from aaa_core.errors import InputError, ModelFileError
from aaa_core.vae import Flux2VAE, Flux2VAEConfig, load_vae, patchify, unpatchify, vae_from_state_dict

# Small enough to run in well under a second, but with every structural feature of the real
# model: four stages (16x downscale), width changes (conv_shortcut), groups > 1 per GroupNorm.
TINY = Flux2VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=8, norm_num_groups=8)
# load_vae cannot see norm_num_groups in the shapes and uses the FLUX.2 value, 32.
TINY_LOADABLE = Flux2VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=8)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every parameter non-default values and the BatchNorm non-trivial statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # biases and GroupNorm affine parameters (norm scales stay near 1)
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1 + centre)
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=gen) * 0.5)
        model.bn.running_var.copy_(torch.rand(model.bn.running_var.shape, generator=gen) * 2 + 0.1)
        model.bn.num_batches_tracked.fill_(1234)
    return model.eval()


def tiny_vae(config: Flux2VAEConfig = TINY, seed: int = 0) -> Flux2VAE:
    return randomize_(Flux2VAE(config), seed).requires_grad_(False)


def diffusers_vae(config: Flux2VAEConfig):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        batch_norm_eps=config.batch_norm_eps,
    ).eval()


def images(batch: int = 2, height: int = 32, width: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` of the expected tensor's scale (elementwise rtol is meaningless near zero)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0.1, "degenerate test data"
    assert err <= rtol * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


# --------------------------------------------------------------------------------------
# Keys and sizes
# --------------------------------------------------------------------------------------


def test_default_keys_and_shapes_match_the_diffusers_file_format():
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ours = Flux2VAE().state_dict()
        theirs = AutoencoderKLFlux2().state_dict()
    assert len(ours) == 251
    assert list(ours) == list(theirs)  # same keys, in the file's order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours["bn.num_batches_tracked"].dtype == torch.int64
    # Parameter count from docs/diffsynth-aaa.md section 6.
    assert sum(v.numel() for k, v in ours.items() if not k.startswith("bn.")) == 84_046_115


def test_config_from_state_dict_recovers_the_sizes():
    with torch.device("meta"):
        full = Flux2VAE().state_dict()
        loadable = Flux2VAE(TINY_LOADABLE).state_dict()
        ungroupable = Flux2VAE(TINY).state_dict()
    assert Flux2VAEConfig.from_state_dict(full) == Flux2VAEConfig()
    assert Flux2VAEConfig.from_state_dict(loadable) == TINY_LOADABLE
    # Widths that FLUX.2's 32 groups cannot split are reported as a bad file, not a crash.
    with pytest.raises(ModelFileError, match="block width 16 is not divisible by norm_num_groups 32"):
        vae_from_state_dict(ungroupable, source="odd.safetensors")


def test_sizes_and_patchify_order():
    with torch.device("meta"):
        vae = Flux2VAE()
    assert vae.latent_channels == 128 and vae.downscale_factor == 16 and vae.dtype == torch.float32
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = patchify(x)
    assert p.shape == (2, 12, 2, 3)
    # channel c*4 + p*2 + q holds pixel (2i + p, 2j + q) of channel c
    c, dp, dq, i, j = 1, 1, 0, 1, 2
    assert p[0, c * 4 + dp * 2 + dq, i, j] == x[0, c, 2 * i + dp, 2 * j + dq]
    assert torch.equal(unpatchify(p), x)


# --------------------------------------------------------------------------------------
# Numerical parity with the references
# --------------------------------------------------------------------------------------


def test_matches_diffusers_plus_pipeline_normalisation():
    torch.manual_seed(0)
    ours = tiny_vae()
    theirs = diffusers_vae(TINY)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = images()
    eps = TINY.batch_norm_eps
    bn_mean = ours.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(ours.bn.running_var.view(1, -1, 1, 1) + eps)

    with torch.no_grad():
        latents = ours.encode(x)
        # What the diffusers FLUX.2 pipelines do: posterior mean, _patchify_latents, BN normalise.
        mean = theirs.encode(x).latent_dist.mean
        b, c, h, w = mean.shape
        ref = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        ref = (ref - bn_mean) / bn_std
        assert latents.shape == (2, 32, 2, 3)
        assert_close(latents, ref)

        z = torch.randn(2, 32, 3, 2)
        decoded = ours.decode(z)
        unnorm = z * bn_std + bn_mean
        b, c, h, w = unnorm.shape
        unpacked = unnorm.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        ref = theirs.decode(unpacked).sample
        assert decoded.shape == (2, 3, 48, 32)
        assert_close(decoded, ref)


def diffsynth_twin(ours: Flux2VAE):
    """The reference implementation's VAE (DiffSynth's Flux2VAE) with our tiny model's weights."""
    from diffsynth.models.flux2_vae import Flux2VAE as DiffSynthVAE

    ref = DiffSynthVAE(
        block_out_channels=TINY.block_out_channels,
        layers_per_block=TINY.layers_per_block,
        latent_channels=TINY.latent_channels,
        num_groups=TINY.norm_num_groups,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def test_matches_diffsynth_flux2_vae():
    torch.manual_seed(0)
    ours = tiny_vae(seed=3)
    ref = diffsynth_twin(ours)
    x = images(batch=1, height=48, width=32, seed=4)
    z = torch.randn(1, 32, 2, 4)
    with torch.no_grad():
        # The same ops in the same order: equal in practice, allow float32 rounding noise.
        assert_close(ours.encode(x), ref.encode(x), rtol=1e-6)
        assert_close(ours.decode(z), ref.decode(z), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_diffsynth_and_stays_near_float32(dtype):
    torch.manual_seed(0)
    ours = tiny_vae(seed=5)
    ref = diffsynth_twin(ours)
    x = images(batch=1, seed=6)
    with torch.no_grad():
        full = ours.encode(x)
        ours, ref = ours.to(dtype), ref.to(dtype)
        assert ours.dtype == dtype and ours.bn.running_var.dtype == dtype
        half = ours.encode(x)  # float32 input is cast to the model's dtype
        assert half.dtype == dtype
        # Same op order as DiffSynth (stats cast to the compute dtype before the sqrt): at most
        # one rounding step apart (identical in practice).
        assert_close(half, ref.encode(x), rtol=1e-2)
        assert_close(half.float(), full, rtol=5e-2)
        decoded = ours.decode(half)
        assert decoded.dtype == dtype and decoded.shape == x.shape
        assert_close(decoded, ref.decode(half), rtol=1e-2)
        assert torch.isfinite(decoded).all()


def test_encode_is_deterministic_and_decode_is_unclamped():
    vae = tiny_vae(seed=7)
    x = images(batch=1, seed=8)
    with torch.inference_mode():
        assert torch.equal(vae.encode(x), vae.encode(x))  # the posterior mean, no sampling
        out = vae.decode(torch.randn(1, 32, 4, 4) * 20)
    assert out.shape == (1, 3, 64, 64)
    assert out.abs().max() > 1.0  # raw decoder output: clamping is the caller's job


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def test_saved_file_round_trips_through_load_vae(tmp_path):
    torch.manual_seed(0)
    original = tiny_vae(TINY_LOADABLE, seed=9)
    path = tmp_path / "tiny_vae.safetensors"
    save_file(original.state_dict(), str(path))

    loaded = load_vae(path)
    assert loaded.config == TINY_LOADABLE
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    x = images(batch=1, seed=10)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), original.encode(x))

    half = load_vae(path, dtype=torch.bfloat16)
    sd = half.state_dict()
    assert half.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if k != "bn.num_batches_tracked")
    assert sd["bn.num_batches_tracked"].dtype == torch.int64 and sd["bn.num_batches_tracked"].item() == 1234
    with torch.no_grad():
        assert half.encode(x).dtype == torch.bfloat16


def test_vae_from_state_dict_adopts_tensors():
    original = tiny_vae(TINY_LOADABLE, seed=11)
    sd = original.state_dict()
    model = vae_from_state_dict(sd)
    assert model.encoder.conv_in.weight.data_ptr() == sd["encoder.conv_in.weight"].data_ptr()
    assert model.bn.running_mean.data_ptr() == sd["bn.running_mean"].data_ptr()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_dit_file_is_rejected_with_a_clear_message(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file(AAADiT(AAADiTConfig(dim=64, depth=1, num_heads=2, text_dim=32)).state_dict(), str(path))
    with pytest.raises(ModelFileError) as info:
        load_vae(path)
    message = str(info.value)
    assert str(path) in message and "AAADiT" in message and "FLUX.2 VAE" in message
    assert "\n" not in message


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(tiny_vae(TINY_LOADABLE).state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as info:
        load_vae(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ModelFileError, match="file not found"):
        load_vae(tmp_path / "nope.safetensors")


def test_wrong_shape_names_the_key(tmp_path):
    sd = tiny_vae(TINY_LOADABLE).state_dict()
    key = "decoder.mid_block.attentions.0.to_q.weight"
    sd[key] = torch.zeros(64, 32)
    path = tmp_path / "vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFileError) as info:
        load_vae(path)
    message = str(info.value)
    assert key in message and "(64, 32)" in message and "(64, 64)" in message and str(path) in message
    assert "\n" not in message


def test_missing_key_is_rejected():
    sd = dict(tiny_vae(TINY_LOADABLE).state_dict())
    del sd["post_quant_conv.weight"]
    with pytest.raises(ModelFileError, match="post_quant_conv.weight"):
        vae_from_state_dict(sd, source="my.safetensors")
    sd = dict(tiny_vae(TINY_LOADABLE).state_dict())
    del sd["decoder.conv_out.bias"]
    with pytest.raises(ModelFileError, match=r"1 missing \(first: decoder.conv_out.bias\)"):
        vae_from_state_dict(sd, source="my.safetensors")


@pytest.mark.parametrize(
    "shape, needle",
    [((3, 30, 32), "rank"), ((1, 3, 30, 32), "16"), ((1, 3, 32, 40), "16"), ((1, 4, 32, 32), "3")],
)
def test_encode_rejects_bad_images(shape, needle):
    vae = tiny_vae(TINY_LOADABLE)
    with pytest.raises(InputError) as info:
        vae.encode(torch.zeros(shape))
    message = str(info.value)
    assert "\n" not in message
    if needle == "rank":
        assert "(batch, 3, height, width)" in message and str(shape) in message
    else:
        assert needle in message


def test_encode_error_for_30x32_mentions_16():
    vae = tiny_vae(TINY_LOADABLE)
    with pytest.raises(InputError, match=r"32x30 is not a multiple of 16"):
        vae.encode(torch.zeros(1, 3, 30, 32))


def test_encode_rejects_integer_images():
    with pytest.raises(InputError, match="floating-point"):
        tiny_vae(TINY_LOADABLE).encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(1, 31, 2, 2), (1, 3, 32, 32), (32, 2, 2)])
def test_decode_rejects_bad_latents(shape):
    vae = tiny_vae(TINY_LOADABLE)
    with pytest.raises(InputError, match=r"\(batch, 32, height, width\)"):
        vae.decode(torch.zeros(shape))
