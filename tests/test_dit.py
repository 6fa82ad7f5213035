"""AAADiT: exact checkpoint keys, numerics against the reference formulation, batching, loading errors."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from aaa_core.checkpoint import read_safetensors, save_safetensors
from aaa_core.dit import AAADiT, AAADiTConfig, load_dit
from aaa_core.errors import ModelFileError
from tiny_models import TINY_DIT, save_tiny_dit


def reference_key_shapes(dim=1024, depth=10, latent=128, text=1024):
    """The 156 keys of step-600000.safetensors, written out from docs/diffsynth-aaa.md section 4.2."""
    keys = {
        "pos_embedder.image_emb": (1, dim, 16, 16),
        "pos_embedder.text_emb": (dim,),
        "timestep_embedder.timestep_embedder.0.weight": (dim, 256),
        "timestep_embedder.timestep_embedder.0.bias": (dim,),
        "timestep_embedder.timestep_embedder.2.weight": (dim, dim),
        "timestep_embedder.timestep_embedder.2.bias": (dim,),
        "image_embedder.0.weight": (dim, latent),
        "image_embedder.0.bias": (dim,),
        "image_embedder.1.weight": (dim,),
        "image_embedder.1.bias": (dim,),
        "text_embedder.0.weight": (dim, text),
        "text_embedder.0.bias": (dim,),
        "text_embedder.1.weight": (dim,),
        "text_embedder.1.bias": (dim,),
        "proj_out.weight": (latent, dim),
        "proj_out.bias": (latent,),
    }
    for i in range(depth):
        for name in ("to_q", "to_k", "to_v", "to_out"):
            keys[f"blocks.{i}.{name}.weight"] = (dim, dim)
            keys[f"blocks.{i}.{name}.bias"] = (dim,)
        keys[f"blocks.{i}.ff.0.weight"] = (3 * dim, dim)
        keys[f"blocks.{i}.ff.0.bias"] = (3 * dim,)
        keys[f"blocks.{i}.ff.2.weight"] = (dim, 3 * dim)
        keys[f"blocks.{i}.ff.2.bias"] = (dim,)
        keys[f"blocks.{i}.to_gate.weight"] = (2 * dim, dim)
        keys[f"blocks.{i}.to_gate.bias"] = (2 * dim,)
    return keys


def test_full_size_state_dict_is_the_published_key_set():
    with torch.device("meta"):
        model = AAADiT()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_key_shapes()
    assert len(shapes) == 156
    assert sum(p.numel() for p in model.parameters()) == 128_824_448  # section 4.3


def test_flops_estimate_matches_reference_table():
    with torch.device("meta"):
        model = AAADiT()
    model.last_block_image_only = False  # all the work the reference does
    assert model.flops_per_forward(256, 128) / 1e9 == pytest.approx(87.0, abs=0.05)  # section 4.4
    model.last_block_image_only = True  # ours: the last block skips 128 text tokens' q, out, MLP and queries
    skipped = 2 * 128 * (2 + 6) * 1024**2 + 4 * 128 * 384 * 1024
    assert model.flops_per_forward(256, 128) == pytest.approx(87.0e9 - skipped, abs=0.05e9)


def test_skipping_the_last_blocks_text_work_changes_nothing():
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT).eval()
    latents, prompt, t = torch.randn(2, 128, 4, 6), torch.randn(2, 20, TINY_DIT.text_dim), torch.tensor([900.0, 30.0])
    with torch.no_grad():
        pruned = model(latents, prompt, t)
        model.last_block_image_only = False
        full = model(latents, prompt, t)
    torch.testing.assert_close(pruned, full, atol=1e-6, rtol=1e-6)


def test_published_layout_file_loads_strictly_with_inferred_config(tmp_path):
    """A file with the published layout (bf16, no config metadata) loads and gets head_dim 32."""
    torch.manual_seed(0)
    config = AAADiTConfig(dim=64, depth=3, num_heads=2, text_dim=48)
    state = {k: v.to(torch.bfloat16) for k, v in AAADiT(config).state_dict().items()}
    path = tmp_path / "step-600000.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})  # exactly what accelerate.save writes
    model = load_dit(path)
    assert model.config == config
    assert model.dtype == torch.bfloat16
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------
# Numerics: our forward against the reference formulation (section 4), batch 1
# --------------------------------------------------------------------------------------


def reference_forward(model: AAADiT, latents, prompt_embeds, timestep):
    """Section 4 transcribed step by step, with the reference's own timestep embedder and attention."""
    from diffsynth.core.attention import attention_forward
    from diffsynth.models.general_modules import TimestepEmbeddings

    sd = model.state_dict()
    cfg = model.config
    temb = TimestepEmbeddings(cfg.time_freq_dim, cfg.dim).to(latents.dtype)
    temb.load_state_dict({k.removeprefix("timestep_embedder."): v for k, v in sd.items() if k.startswith("timestep_embedder.")})
    B, C, H, W = latents.shape
    image_pos = F.interpolate(sd["pos_embedder.image_emb"].to(latents.dtype), size=(H, W), mode="bilinear")
    image_pos = image_pos.permute(0, 2, 3, 1).reshape(1, H * W, cfg.dim)
    text_pos = sd["pos_embedder.text_emb"].to(prompt_embeds.dtype).expand(1, prompt_embeds.shape[1], cfg.dim)
    pos = torch.cat([image_pos, text_pos], dim=1)
    t_emb = temb(timestep, dtype=latents.dtype).view(1, 1, -1)

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def layer_norm(x, name):
        return F.layer_norm(x, (cfg.dim,), sd[f"{name}.weight"], sd[f"{name}.bias"])

    image = layer_norm(linear(latents.permute(0, 2, 3, 1).reshape(B, H * W, C), "image_embedder.0"), "image_embedder.1")
    text = layer_norm(linear(prompt_embeds, "text_embedder.0"), "text_embedder.1")
    emb = torch.cat([image, text], dim=1)
    rms = torch.nn.RMSNorm(cfg.dim, elementwise_affine=False)
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        gate_attn, gate_mlp = linear(t_emb, f"{p}.to_gate").chunk(2, dim=-1)
        h = rms(emb + pos)
        q, k, v = (linear(h, f"{p}.{n}") for n in ("to_q", "to_k", "to_v"))
        attn = attention_forward(q, k, v, q_pattern="b s (n d)", k_pattern="b s (n d)", v_pattern="b s (n d)",
                                 out_pattern="b s (n d)", dims={"n": cfg.num_heads})
        emb = emb + linear(attn, f"{p}.to_out") * (1 + gate_attn)
        h = rms(emb + pos)
        emb = emb + linear(F.silu(linear(h, f"{p}.ff.0")), f"{p}.ff.2") * (1 + gate_mlp)
    out = linear(emb[:, : H * W], "proj_out")
    return out.reshape(B, H, W, C).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(16, 16), (4, 6)])
def test_forward_matches_reference_formulation(size):
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT).eval()
    latents = torch.randn(1, 128, *size)
    prompt = torch.randn(1, 128, TINY_DIT.text_dim)
    t = torch.tensor([815.625])
    with torch.no_grad():
        ours = model(latents, prompt, t)
        ref = reference_forward(model, latents, prompt, t)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_timestep_embedding_equals_reference_module():
    from diffsynth.models.general_modules import TimestepEmbeddings

    torch.manual_seed(0)
    model = AAADiT(TINY_DIT)
    ref = TimestepEmbeddings(256, TINY_DIT.dim)
    ref.load_state_dict({k.removeprefix("timestep_embedder."): v for k, v in model.state_dict().items() if k.startswith("timestep_embedder.")})
    t = torch.tensor([0.0, 1.5, 500.0, 999.9])
    with torch.no_grad():
        assert torch.equal(model.timestep_embedder(t, torch.float32), ref(t, dtype=torch.float32))


def test_batch_with_per_sample_timesteps_equals_batch_one():
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT).eval()
    latents = torch.randn(4, 128, 3, 5)
    prompt = torch.randn(4, 9, TINY_DIT.text_dim)
    t = torch.tensor([1000.0, 642.5, 101.0, 2.2])
    with torch.no_grad():
        batched = model(latents, prompt, t)
        single = torch.cat([model(latents[i : i + 1], prompt[i : i + 1], t[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # A single timestep broadcasts over the batch.
    with torch.no_grad():
        shared = model(latents, prompt, t[:1])
        each = model(latents, prompt, t[:1].expand(4).clone())
    torch.testing.assert_close(shared, each, atol=0, rtol=0)


def test_bfloat16_forward_stays_close_to_float32():
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT).eval()
    latents, prompt, t = torch.randn(2, 128, 4, 4), torch.randn(2, 16, TINY_DIT.text_dim), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        full = model(latents, prompt, t)
        half = model.to(torch.bfloat16)(latents.bfloat16(), prompt.bfloat16(), t)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT)
    latents, prompt, t = torch.randn(2, 128, 4, 4), torch.randn(2, 8, TINY_DIT.text_dim), torch.tensor([700.0, 300.0])
    model(latents, prompt, t).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(latents, prompt, t).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------


def test_our_checkpoint_round_trips_config_through_metadata(tmp_path):
    path = save_tiny_dit(tmp_path / "dit.safetensors", AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32))
    assert load_dit(path).config.num_heads == 4  # not the head_dim-32 default of 2


def test_vae_file_given_as_dit_names_the_problem(tmp_path):
    path = tmp_path / "flux2-vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 32, 3, 3), "bn.running_mean": torch.zeros(128)}, str(path))
    with pytest.raises(ModelFileError, match=r"flux2-vae\.safetensors: holds a FLUX\.2 VAE, but an AAADiT diffusion model was expected"):
        load_dit(path)


def test_truncated_and_missing_files_give_one_line_errors(tmp_path):
    path = save_tiny_dit(tmp_path / "dit.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.safetensors: not a readable safetensors file") as err:
        load_dit(truncated)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelFileError, match="nope.safetensors: file not found"):
        load_dit(tmp_path / "nope.safetensors")


def test_wrong_shape_and_missing_key_are_named(tmp_path):
    state, _ = read_safetensors(save_tiny_dit(tmp_path / "dit.safetensors"))
    bad = dict(state, **{"blocks.0.to_q.weight": torch.zeros(3, 3)})
    save_safetensors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match=r"blocks\.0\.to_q\.weight has shape \(3, 3\)"):
        load_dit(tmp_path / "bad.safetensors")
    missing = {k: v for k, v in state.items() if k != "proj_out.bias"}
    save_safetensors(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match=r"1 missing \(first: proj_out\.bias\)"):
        load_dit(tmp_path / "missing.safetensors")


def test_head_count_without_metadata_assumes_the_reference_head_dim_32():
    state = AAADiT(AAADiTConfig(dim=128, depth=1, num_heads=2, text_dim=16)).state_dict()
    assert AAADiTConfig.from_state_dict(state).num_heads == 4


def test_layers_come_from_the_given_operations_namespace(tmp_path):
    """ComfyUI passes comfy.ops.manual_cast here; any namespace with torch's constructors works."""
    from types import SimpleNamespace

    class CountingLinear(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    ops = SimpleNamespace(Linear=CountingLinear, LayerNorm=torch.nn.LayerNorm)
    path = save_tiny_dit(tmp_path / "dit.safetensors")
    plain, custom = load_dit(path), load_dit(path, operations=ops)
    assert isinstance(custom.blocks[0].to_q, CountingLinear)
    x, c, t = torch.randn(1, 128, 2, 2), torch.randn(1, 5, TINY_DIT.text_dim), torch.tensor([10.0])
    with torch.no_grad():
        assert torch.equal(custom(x, c, t), plain(x, c, t))
    assert CountingLinear.calls == 2 + 2 + 7 * TINY_DIT.depth + 1  # t-MLP, embedders, per block, proj_out
