"""Checkpoint writes, image conversions and model-file resolution (downloads)."""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aaa_core import downloads
from aaa_core.checkpoint import identify_model, read_safetensors, save_safetensors
from aaa_core.outputs import atomic_output
from aaa_core.errors import InputError, ModelFileError
from aaa_core.images import comfy_to_vae, open_rgb, pil_to_tensor, resize_cover, tensor_to_pil, vae_to_comfy
from tiny_models import save_tiny_vae

# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "model.safetensors"
    save_safetensors({"a": torch.ones(2)}, target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("crash while writing")
    state, metadata = read_safetensors(target)
    assert torch.equal(state["a"], torch.ones(2))
    assert metadata == {"format": "pt", "step": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_safetensors({"a": torch.ones(1)}, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_casts_only_floating_tensors(tmp_path):
    save_safetensors({"w": torch.randn(3), "n": torch.tensor(5)}, tmp_path / "x.safetensors")
    state, _ = read_safetensors(tmp_path / "x.safetensors", dtype=torch.bfloat16)
    assert state["w"].dtype == torch.bfloat16
    assert state["n"].dtype == torch.int64


def test_folder_and_unknown_files_are_reported(tmp_path):
    with pytest.raises(ModelFileError, match="is a folder"):
        read_safetensors(tmp_path)
    assert identify_model(["foo.weight"]) is None


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        open_rgb(tmp_path / "broken.png")
    with pytest.raises(InputError, match="gone.png: image not found"):
        open_rgb(tmp_path / "gone.png")


def test_resize_cover_keeps_aspect_and_centre_crops():
    image = Image.new("RGB", (400, 200))
    image.paste((255, 0, 0), (0, 0, 100, 200))  # left quarter red: cropped away by the centre crop
    out = resize_cover(image, 256, 256)
    assert out.size == (256, 256)
    assert np.array(out)[128, 0].tolist() != [255, 0, 0]
    assert resize_cover(Image.new("RGB", (100, 300)), 64, 32).size == (64, 32)


def test_pil_tensor_round_trip_matches_reference_rules():
    from diffsynth.diffusion.base_pipeline import BasePipeline

    pipe = BasePipeline(device="cpu", torch_dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8))
    ours = pil_to_tensor(image, torch.bfloat16)
    assert ours.shape == (1, 3, 8, 16)
    assert torch.equal(ours, pipe.preprocess_image(image))
    decoded = torch.randn(1, 3, 8, 16) * 1.5  # out of range values get clipped
    assert np.array_equal(np.array(tensor_to_pil(decoded)[0]), np.array(pipe.vae_output_to_image(decoded)))


def test_comfy_image_conversion_round_trip():
    comfy = torch.rand(2, 8, 16, 3)
    vae_input = comfy_to_vae(comfy)
    assert vae_input.shape == (2, 3, 8, 16)
    assert vae_input.min() >= -1 and vae_input.max() <= 1
    torch.testing.assert_close(vae_to_comfy(vae_input), comfy)


# --------------------------------------------------------------------------------------
# Model files and downloads
# --------------------------------------------------------------------------------------


def test_local_file_wins_and_missing_local_file_is_named(tmp_path):
    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"x")
    assert downloads.resolve_model_file(downloads.DIT, local) == local
    with pytest.raises(ModelFileError, match="nope.safetensors: AAADiT file not found"):
        downloads.resolve_model_file(downloads.DIT, tmp_path / "nope.safetensors")


def test_file_already_in_model_dir_is_used_without_network(tmp_path):
    cached = save_tiny_vae(tmp_path / downloads.VAE.local_name)
    assert downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path) == cached


def test_model_dir_defaults_to_env_then_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AAA_MODEL_DIR", str(tmp_path / "models"))
    assert downloads.default_model_dir() == tmp_path / "models"
    monkeypatch.delenv("AAA_MODEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert downloads.default_model_dir() == tmp_path / "cache" / "aaa_dit"


def test_download_is_atomic_and_reports_progress(tmp_path, monkeypatch):
    """A stand-in for ModelScope writes the file into the staging folder the way snapshot_download does."""
    calls = []
    weights = save_tiny_vae(tmp_path / "source" / "vae.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "source")

    def fake_snapshot_download(repo_id, allow_patterns, local_dir, progress_callbacks=()):
        calls.append((repo_id, allow_patterns))
        path = tmp_path / local_dir / allow_patterns[0]
        path.parent.mkdir(parents=True)
        path.write_bytes(weights)
        for cls in progress_callbacks:
            callback = cls(allow_patterns[0], 7)
            callback.update(3)
            callback.update(4)

    import importlib

    module = importlib.import_module("modelscope.hub.snapshot_download")  # the package re-exports a same-named function
    monkeypatch.setattr(module, "snapshot_download", fake_snapshot_download)
    progress = []
    path = downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path, progress=lambda d, t: progress.append((d, t)))
    assert path == tmp_path / "flux2_vae.safetensors" and path.read_bytes() == weights
    assert calls == [("black-forest-labs/FLUX.2-klein-4B", ["vae/diffusion_pytorch_model.safetensors"])]
    assert progress == [(3, 7), (7, 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux2_vae.safetensors"]  # staging folder removed


def test_download_without_modelscope_installed_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)  # makes the import fail
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path)
    message = str(err.value)
    assert "pip install modelscope" in message and str(tmp_path / "flux2_vae.safetensors") in message
    assert "https://modelscope.cn/models/black-forest-labs/FLUX.2-klein-4B/files" in message
    assert "\n" not in message


def test_offline_download_names_the_file_the_place_and_the_fix(tmp_path):
    """The real ModelScope client, with no network: one clear line, no partial file."""
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.DIT, model_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "aaa_dit_step-600000.safetensors") in message
    assert "download from ModelScope failed" in message
    assert "'step-600000.safetensors' from https://modelscope.cn/models/DiffSynth-Studio/AAAMyModel/files" in message
    assert list(tmp_path.iterdir()) == []
