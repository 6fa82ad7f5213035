"""The loader nodes and their model files, in the ComfyUI imported in-process: dropdowns, weight dtypes, the
first-run download (progress, Cancel, offline error) and one-line errors for wrong files.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time

import pytest
import torch

from node_helpers import bridge, core_downloads, errors, one_line_error, record_progress, use_model_dirs
from pack_import import NODES, PACK_NAME, node, pack_module

import comfy.model_base  # noqa: E402  (on sys.path once the pack is imported)
import comfy.model_patcher  # noqa: E402

native_model = pack_module("nodes.native_model")

pytestmark = pytest.mark.usefixtures("model_folders")


def test_dropdowns_list_the_folder_and_offer_the_official_file(models_root):
    dit_choices = NODES["AAADiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    assert dit_choices == ["aaa_tiny.safetensors", "aaa_dit_step-600000.safetensors"]
    assert NODES["AAAVAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["flux2_tiny.safetensors", "flux2_vae.safetensors"]
    te_choices = NODES["AAATextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert te_choices == ["qwen3_tiny.safetensors", "qwen3_0.6b.safetensors"]


def test_official_file_on_disk_is_listed_once(models_root, tmp_path, monkeypatch):
    (tmp_path / "flux2_vae.safetensors").write_bytes((models_root / "vae" / "flux2_tiny.safetensors").read_bytes())
    use_model_dirs(monkeypatch, {"vae": [tmp_path]})
    assert NODES["AAAVAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["flux2_vae.safetensors"]
    (vae,) = node("AAAVAELoader")("flux2_vae.safetensors", "auto")
    assert vae.path == tmp_path / "flux2_vae.safetensors"


def test_loaders_return_comfyui_models_in_fp32_on_the_cpu(models):
    # The DiT is a native MODEL: a ModelPatcher around ComfyUI's BaseModel holding the AAADiT.
    assert isinstance(models.dit, comfy.model_patcher.ModelPatcher) and isinstance(models.dit.model, comfy.model_base.BaseModel)
    assert native_model.compute_dtype(models.dit) == torch.float32 and models.dit.model_dtype() == torch.float32
    assert models.dit.model.diffusion_model.config.text_dim == 32
    assert models.text_encoder.model.dtype == torch.float32 and models.text_encoder.path.name == "qwen3_tiny.safetensors"
    assert models.vae.model.latent_channels == 128 and models.vae.model.downscale_factor == 16
    # The text encoder and VAE are placed by ComfyUI's memory manager too.
    assert isinstance(models.vae.patcher, comfy.model_patcher.ModelPatcher) and models.vae.patcher.model.inner is models.vae.model
    assert native_model.load_patched(models.dit) is models.dit.model.diffusion_model
    assert models.vae.load() is models.vae.model


def test_weight_dtype_choice_is_applied_by_every_loader(models_root):
    (dit,) = node("AAADiTLoader")("aaa_tiny.safetensors", "bf16")
    assert dit.model_dtype() == torch.bfloat16 and dit.model.diffusion_model.dtype == torch.bfloat16
    # ComfyUI computes in its manual-cast dtype where the device lacks bf16 (comfy.ops casts per layer).
    assert native_model.compute_dtype(dit) == bridge.dit_dtypes("bf16", dit.load_device)[1]
    (text_encoder,) = node("AAATextEncoderLoader")("qwen3_tiny.safetensors", "fp16")
    assert text_encoder.weight_dtype == torch.float16 and text_encoder.model.dtype == torch.float16
    (vae,) = node("AAAVAELoader")("flux2_tiny.safetensors", "bf16")
    assert vae.weight_dtype == torch.bfloat16 and vae.model.dtype == torch.bfloat16
    with pytest.raises(errors.InputError, match="weight_dtype must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        node("AAAVAELoader")("flux2_tiny.safetensors", "fp8")


def test_missing_official_file_is_downloaded_into_the_first_folder_with_byte_progress(models_root, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    use_model_dirs(monkeypatch, {"vae": [first, second]})
    weights = (models_root / "vae" / "flux2_tiny.safetensors").read_bytes()
    calls = []

    def fake_download(source, target, progress):
        calls.append((source.repo_id, target))
        progress(len(weights) // 2, len(weights))
        time.sleep(0.3)  # long enough for the waiting thread to report it
        progress(len(weights), len(weights))
        target.write_bytes(weights)
        return target

    monkeypatch.setattr(core_downloads, "download", fake_download)
    updates = record_progress(monkeypatch)
    (vae,) = node("AAAVAELoader")("flux2_vae.safetensors", "auto")
    assert calls == [("black-forest-labs/FLUX.2-klein-4B", first / "flux2_vae.safetensors")]
    assert vae.path == first / "flux2_vae.safetensors" and vae.model.latent_channels == 128
    assert updates[0] == (len(weights) // 2, len(weights)) and updates[-1] == (len(weights), len(weights))


def test_download_stops_when_cancel_is_pressed(tmp_path, monkeypatch):
    use_model_dirs(monkeypatch, {"unet": [tmp_path]})
    stopped = threading.Event()

    def endless_download(source, target, progress):
        try:
            for done in range(1, 10_000):
                progress(done, 10_000)
                time.sleep(0.01)
        finally:
            stopped.set()
        raise AssertionError("the download was not cancelled")

    monkeypatch.setattr(core_downloads, "download", endless_download)
    record_progress(monkeypatch, interrupt_after=1)
    started = time.perf_counter()
    with pytest.raises(bridge.Interrupted):
        node("AAADiTLoader")("aaa_dit_step-600000.safetensors", "auto")
    assert time.perf_counter() - started < 5
    assert stopped.wait(5), "the download worker kept running"
    assert not (tmp_path / "aaa_dit_step-600000.safetensors").exists()


def test_offline_download_error_names_the_file_the_folder_and_the_url(tmp_path, monkeypatch):
    """An empty folder: the dropdown offers only the official name, and offline the error says where to put it."""
    # importlib: the modelscope.hub package re-exports a function of the same name as the module.
    snapshot_module = importlib.import_module("modelscope.hub.snapshot_download")

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    monkeypatch.setattr(snapshot_module, "snapshot_download", offline)
    use_model_dirs(monkeypatch, {"unet": [tmp_path]})
    assert NODES["AAADiTLoader"].INPUT_TYPES()["required"]["dit_name"][0] == ["aaa_dit_step-600000.safetensors"]
    with pytest.raises(errors.ModelFileError) as excinfo:
        node("AAADiTLoader")("aaa_dit_step-600000.safetensors", "auto")
    message = one_line_error(excinfo)
    assert message.startswith("dit_name 'aaa_dit_step-600000.safetensors': ")  # the widget to change
    assert str(tmp_path / "aaa_dit_step-600000.safetensors") in message
    assert "'step-600000.safetensors' from https://modelscope.cn/models/DiffSynth-Studio/AAAMyModel/files" in message
    assert " --" not in message and "explicitly" not in message  # no advice meant for the command line
    assert list(tmp_path.iterdir()) == []


def test_file_not_in_the_folder_names_the_folder_and_the_expected_file(tmp_path, monkeypatch):
    use_model_dirs(monkeypatch, {"clip": [tmp_path]})
    with pytest.raises(errors.ModelFileError) as excinfo:
        node("AAATextEncoderLoader")("someone_elses_te.safetensors", "auto")
    message = one_line_error(excinfo)
    assert "'someone_elses_te.safetensors' is not in the 'clip' model folder" in message and str(tmp_path) in message
    assert "Qwen3-0.6B" in message and "qwen3_0.6b.safetensors" in message


def test_vae_file_picked_in_the_dit_loader_says_what_it_is(models_root, monkeypatch):
    use_model_dirs(monkeypatch, {"unet": [models_root / "vae"]})
    with pytest.raises(errors.ModelFileError) as excinfo:
        node("AAADiTLoader")("flux2_tiny.safetensors", "auto")
    message = one_line_error(excinfo)
    assert "flux2_tiny.safetensors: holds a FLUX.2 VAE, but an AAADiT diffusion model was expected" in message


def test_missing_tokenizer_is_a_one_line_error(models_root, tmp_path, monkeypatch):
    text_encoder = sys.modules.get(f"{PACK_NAME}.aaa_core.text_encoder") or importlib.import_module(f"{PACK_NAME}.aaa_core.text_encoder")
    monkeypatch.setattr(text_encoder, "ASSETS_DIR", tmp_path)  # as if the packaged tokenizer were gone
    text_encoder._packaged_tokenizer.cache_clear()
    try:
        with pytest.raises(errors.ModelFileError) as excinfo:
            node("AAATextEncoderLoader")("qwen3_tiny.safetensors", "auto")
    finally:
        text_encoder._packaged_tokenizer.cache_clear()
    assert f"{tmp_path}: tokenizer files cannot be loaded" in one_line_error(excinfo)
