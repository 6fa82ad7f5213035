"""The three model files are checked against each other before any is loaded, and every bad one is named at once."""

from __future__ import annotations

import pytest

from aaa_core import pipeline
from aaa_core.dit import AAADiTConfig
from aaa_core.errors import ModelFileError
from aaa_core.pipeline import AAAPipeline
from tiny_models import TINY_DIT, save_tiny_dit, save_tiny_models

pytestmark = pytest.mark.usefixtures("no_heavy_loads")


@pytest.fixture
def files(models_root):
    return {key: models_root / sub for key, sub in (("dit", "unet/aaa_tiny.safetensors"), ("vae", "vae/flux2_tiny.safetensors"), ("text_encoder", "clip/qwen3_tiny.safetensors"))}


@pytest.fixture
def no_heavy_loads(monkeypatch):
    """Every error here must come from the checks, before any model's weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the files were checked")

    for name in ("load_dit", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(pipeline, name, refuse)


def from_files_error(**paths) -> str:
    with pytest.raises(ModelFileError) as err:
        AAAPipeline.from_files(device="cpu", dtype="fp32", **paths)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_dit_for_another_text_encoder_is_refused_before_loading(files, tmp_path):
    dit = save_tiny_dit(tmp_path / "wide_text.safetensors", AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=48))
    message = from_files_error(**{**files, "dit": dit})
    assert message == (
        f"{dit}: this AAADiT takes 48-wide text embeddings, but the text encoder {files['text_encoder']} gives 32 "
        "(its hidden_size); use the text encoder the DiT was trained with"
    )


def test_dit_for_other_latents_is_refused_before_loading(files, tmp_path):
    dit = save_tiny_dit(tmp_path / "latent64.safetensors", AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32, latent_channels=64))
    message = from_files_error(**{**files, "dit": dit})
    assert message.startswith(f"{dit}: this AAADiT works on 64-channel latents, but the VAE {files['vae']} has 128")


def test_every_bad_file_is_named_in_one_error(files, tmp_path):
    truncated = tmp_path / "truncated_vae.safetensors"
    truncated.write_bytes(files["vae"].read_bytes()[:-64])
    message = from_files_error(**{**files, "dit": files["vae"], "vae": truncated})
    assert message.startswith(f"2 model files are bad: (1) {files['vae']}: holds a FLUX.2 VAE, but an AAADiT diffusion model was expected")
    assert f"(2) {truncated}: not a readable safetensors file" in message


def test_every_missing_file_is_named_in_one_error(tmp_path):
    message = from_files_error(dit=tmp_path / "a.safetensors", vae=tmp_path / "b.safetensors", text_encoder=tmp_path / "c")
    assert message.startswith("3 model files are missing or bad: (1) ")
    for name, label in (("c", "Qwen3-0.6B text encoder"), ("a.safetensors", "AAADiT"), ("b.safetensors", "FLUX.2 VAE")):
        assert f"{tmp_path / name}: {label} file not found" in message


def test_text_encoder_with_a_broken_config_is_caught_with_the_others(files, tmp_path):
    paths = save_tiny_models(tmp_path)
    (paths["text_encoder"].parent / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 0}')
    message = from_files_error(dit=paths["dit"], vae=paths["vae"], text_encoder=paths["text_encoder"])
    assert message == f"{paths['text_encoder'].parent / 'config.json'}: not a valid Qwen3 config.json (hidden_size must be a positive integer, got 0)"


@pytest.mark.usefixtures("model_folders")
def test_sampler_node_refuses_a_dit_for_other_latents(models, prompts, tmp_path, monkeypatch):
    from node_helpers import errors, one_line_error, use_model_dirs
    from pack_import import node

    save_tiny_dit(tmp_path / "latent64.safetensors", AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=TINY_DIT.text_dim, latent_channels=64))
    use_model_dirs(monkeypatch, {"unet": [tmp_path]})
    (dit,) = node("AAADiTLoader")("latent64.safetensors", "auto")
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.ModelFileError) as err:
        node("AAASampler")(dit, *prompts, latent, seed=0, steps=1, cfg=1.0, denoise=1.0)
    assert one_line_error(err).startswith("model: this AAADiT works on 64-channel latents, but latent_image has 128")
