"""The ComfyUI nodes called directly inside the ComfyUI imported in-process, on tiny model files.

The pack is imported as ComfyUI imports it (``pack_import``); the reference results come from the
top-level ``aaa_core`` the CLI uses: same code, separately loaded models.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aaa_core.dit import load_dit
from aaa_core.sampling import make_noise, sample
from node_helpers import bridge, embeds, errors, one_line_error, pack, record_progress
from pack_import import NODES, node

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("model_folders")


# --------------------------------------------------------------------------------------
# Metadata and import
# --------------------------------------------------------------------------------------


def test_node_metadata_ids_tooltips_descriptions_categories():
    assert set(NODES) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in NODES.items():
        assert node_id.startswith("AAA"), node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("AAA ")
        assert cls.CATEGORY.startswith("AAADiT/"), node_id
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20, node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), node_id
        inputs = cls.INPUT_TYPES()
        assert set(inputs) == {"required"}
        for name, spec in inputs["required"].items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        json.dumps(inputs)  # /object_info serialises it
    # The DiT is a native MODEL and the text encoder a native CLIP too; AAA Text Encoder Loader and
    # the VAE travel in our own socket types, so they cannot be wired into native nodes that expect
    # a CLIP or VAE.
    assert NODES["AAADiTLoader"].RETURN_TYPES == ("MODEL",)
    assert NODES["AAACLIPLoader"].RETURN_TYPES == ("CLIP",)
    assert NODES["AAATextEncoderLoader"].RETURN_TYPES == ("AAA_TEXT_ENCODER",)
    assert NODES["AAAVAELoader"].RETURN_TYPES == ("AAA_VAE",)
    assert NODES["AAASampler"].INPUT_TYPES()["required"]["model"][0] == "MODEL"


def test_importing_the_pack_loads_no_model_and_touches_no_network():
    """A fresh interpreter with ComfyUI booted imports the pack with sockets and model construction watched."""
    script = f"""
import importlib.util, socket, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from comfyui_inprocess import boot
assert boot() is not None
import torch

def no_network(*args, **kwargs):
    raise AssertionError("network touched at import time")
socket.socket.connect = no_network
socket.create_connection = no_network
modules = []
original_init = torch.nn.Module.__init__
def counting_init(self, *args, **kwargs):
    modules.append(type(self).__name__)
    original_init(self, *args, **kwargs)
torch.nn.Module.__init__ = counting_init
before = set(sys.modules)

spec = importlib.util.spec_from_file_location("aaa_pack", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["aaa_pack"] = pack
spec.loader.exec_module(pack)
assert len(pack.NODE_CLASS_MAPPINGS) == 12
assert modules == [], modules
# Nothing heavy beyond what ComfyUI itself has loaded.
heavy = [name for name in set(sys.modules) - before if name.split(".")[0] in ("transformers", "modelscope", "diffusers", "comfy")]
assert heavy == [], heavy
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --------------------------------------------------------------------------------------
# Conditioning and latents
# --------------------------------------------------------------------------------------


def test_text_encode_gives_comfyui_conditioning(models, prompts):
    positive, _ = prompts
    assert isinstance(positive, list) and len(positive) == 1 and set(positive[0][1]) == {"pooled_output"}
    tensor = embeds(positive)
    assert tensor.shape == (1, 128, 32) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    assert positive[0][1]["pooled_output"].shape == (1, 0)  # none, yet Conditioning (Zero Out) works on it
    expected = models.text_encoder.model.encode(["a green lizard pokemon with a plant bulb on its back"])
    assert torch.equal(tensor, expected)


def test_empty_latent_is_flux2_shaped_zeros():
    (latent,) = node("AAAEmptyLatentImage")(width=64, height=48, batch_size=2)
    assert set(latent) == {"samples"}
    samples = latent["samples"]
    assert samples.shape == (2, 128, 3, 4) and samples.dtype == torch.float32 and not samples.any()


def test_width_not_a_multiple_of_16_fails_validation_and_execution():
    cls = NODES["AAAEmptyLatentImage"]
    assert cls.VALIDATE_INPUTS(width=256, height=256) is True
    message = cls.VALIDATE_INPUTS(width=250, height=256)
    assert "width 250 is not a positive multiple of 16; try 256" in message
    assert "height 9000 is above the maximum" in cls.VALIDATE_INPUTS(width=256, height=9000)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAEmptyLatentImage")(width=250, height=256, batch_size=1)
    assert "width 250" in one_line_error(excinfo)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def reference_dit(models):
    """The same file loaded by the top-level aaa_core, as the CLI does."""
    return load_dit(models.dit_path)


def test_sampler_output_equals_core_sample_for_the_same_seed(models, prompts):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=64, height=48, batch_size=2)
    (result,) = node("AAASampler")(models.dit, positive, negative, latent, seed=7, steps=3, cfg=10.0, denoise=1.0)
    with torch.inference_mode():
        expected = sample(reference_dit(models), make_noise(7, 2, 3, 4), embeds(positive), embeds(negative), 3, 10.0)
    samples = result["samples"]
    assert samples.dtype == torch.float32 and samples.device.type == "cpu"
    assert torch.equal(samples, expected)
    assert not latent["samples"].any()  # the input latent is untouched


def test_img2img_with_denoise_below_1_equals_core_sample(models, prompts):
    positive, negative = prompts
    pixels = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(3))
    (encoded,) = node("AAAVAEEncode")(pixels, models.vae)
    original = encoded["samples"].clone()
    (result,) = node("AAASampler")(models.dit, positive, negative, encoded, seed=11, steps=4, cfg=10.0, denoise=0.6)
    with torch.inference_mode():
        expected = sample(
            reference_dit(models), make_noise(11, 1, 3, 4), embeds(positive), embeds(negative), 4, 10.0,
            denoise=0.6, init_latents=original,
        )
    assert torch.equal(result["samples"], expected)
    assert torch.equal(encoded["samples"], original)


def test_sampler_keeps_other_latent_keys_and_honours_batch_index(models, prompts):
    positive, negative = prompts
    (batch,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=2)
    (full,) = node("AAASampler")(models.dit, positive, negative, batch, seed=5, steps=2, cfg=10.0, denoise=1.0)
    # What ComfyUI's Latent From Batch (index 1) hands on: one image and its index in the batch.
    picked = {"samples": batch["samples"][1:2].clone(), "batch_index": [1], "custom": "kept"}
    (one,) = node("AAASampler")(models.dit, positive, negative, picked, seed=5, steps=2, cfg=10.0, denoise=1.0)
    assert one["batch_index"] == [1] and one["custom"] == "kept" and picked["samples"].abs().sum() == 0
    # Same noise (seed 5 + 1); batch 1 vs 2 only changes float32 matmul rounding.
    torch.testing.assert_close(one["samples"], full["samples"][1:2], rtol=1e-4, atol=1e-5)


def test_cfg_1_needs_no_negative_pass_and_denoise_0_returns_the_input(models, prompts):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    (result,) = node("AAASampler")(models.dit, positive, negative, latent, seed=1, steps=2, cfg=1.0, denoise=1.0)
    with torch.inference_mode():
        expected = sample(reference_dit(models), make_noise(1, 1, 2, 2), embeds(positive), None, 2, 1.0)
    assert torch.equal(result["samples"], expected)
    (unchanged,) = node("AAASampler")(models.dit, positive, negative, result, seed=1, steps=2, cfg=1.0, denoise=0.0)
    assert torch.equal(unchanged["samples"], result["samples"]) and unchanged["samples"] is not result["samples"]


def test_sampler_ticks_progress_once_per_step_and_prints_a_console_line(models, prompts, monkeypatch, capsys):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    updates = record_progress(monkeypatch)
    node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=4, cfg=10.0, denoise=1.0)
    assert updates == [(1, 4), (2, 4), (3, 4), (4, 4)]
    console = capsys.readouterr().err
    assert "AAA Sampler: 100%" in console and "4/4" in console and "step/s" in console


def test_cancel_stops_sampling_within_one_step(models, prompts, monkeypatch, capsys):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    updates = record_progress(monkeypatch, interrupt_after=2)
    forwards = []
    dit = models.dit.model.diffusion_model
    # Counted as they start: current ComfyUI's layers also stop a forward midway on Cancel (comfy.ops).
    hook = dit.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(bridge.Interrupted):
            node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=20, cfg=10.0, denoise=1.0)
    finally:
        hook.remove()
    assert updates == [(1, 20), (2, 20)]
    assert len(forwards) == 3  # the step during which Cancel was pressed, then nothing more
    assert "2/20" in capsys.readouterr().err  # the console line stops where Cancel did


@pytest.mark.parametrize(
    "make_latent, expected",
    [
        (lambda: {"samples": torch.zeros(1, 4, 32, 32)}, "latent_image has 4 channels (a Stable Diffusion 1.x/SDXL latent?)"),
        (lambda: {"samples": torch.zeros(1, 128, 2, 4, 4)}, "latent_image has shape (1, 128, 2, 4, 4)"),
        (lambda: torch.zeros(1, 128, 4, 4), "latent_image is not a LATENT"),
    ],
)
def test_latent_from_another_model_is_a_one_line_error(models, prompts, make_latent, expected):
    positive, negative = prompts
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, make_latent(), seed=0, steps=2, cfg=10.0, denoise=1.0)
    assert expected in one_line_error(excinfo)


def test_bad_conditioning_is_a_one_line_error(models, prompts):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    sampler = node("AAASampler")
    cases = [
        (positive + positive, negative, "positive conditioning has 2 entries"),
        (positive, [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]], "negative conditioning is 768 wide but this AAADiT takes 32"),
        ([], negative, "positive conditioning is empty"),
    ]
    for pos, neg, expected in cases:
        with pytest.raises(errors.InputError) as excinfo:
            sampler(models.dit, pos, neg, latent, seed=0, steps=2, cfg=10.0, denoise=1.0)
        assert expected in one_line_error(excinfo)


# --------------------------------------------------------------------------------------
# VAE decode / encode
# --------------------------------------------------------------------------------------


def test_decode_gives_float32_images_in_0_1_one_tick_per_image(models, monkeypatch, capsys):
    latents = {"samples": torch.randn(3, 128, 3, 4, generator=torch.Generator().manual_seed(0))}
    updates = record_progress(monkeypatch)
    (images,) = node("AAAVAEDecode")(latents, models.vae)
    assert images.shape == (3, 48, 64, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert updates == [(1, 3), (2, 3), (3, 3)]
    assert "AAA VAE Decode: 100%" in capsys.readouterr().err


def test_cancel_stops_decoding_within_one_image(models, monkeypatch):
    latents = {"samples": torch.zeros(4, 128, 2, 2)}
    updates = record_progress(monkeypatch, interrupt_after=1)
    with pytest.raises(bridge.Interrupted):
        node("AAAVAEDecode")(latents, models.vae)
    assert updates == [(1, 4)]


def test_encode_centre_crops_to_a_multiple_of_16_and_logs_it(models, caplog):
    pixels = torch.rand(2, 40, 70, 4)  # RGBA, 70x40 -> 64x32
    with caplog.at_level(logging.INFO):
        (latent,) = node("AAAVAEEncode")(pixels, models.vae)
    samples = latent["samples"]
    assert samples.shape == (2, 128, 2, 4) and samples.dtype == torch.float32
    assert "centre-cropped 70x40 to 64x32" in caplog.text
    # The crop is the middle: the same as encoding the middle pixels directly.
    (middle,) = node("AAAVAEEncode")(pixels[:, 4:36, 3:67, :3].clone(), models.vae)
    assert torch.equal(middle["samples"], samples)


def test_encode_rejects_images_smaller_than_16_pixels(models):
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAVAEEncode")(torch.rand(1, 8, 64, 3), models.vae)
    assert "image height 8 is smaller than 16 pixels" in one_line_error(excinfo)


def test_decode_then_encode_round_trip_stays_in_latent_space(models):
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    (images,) = node("AAAVAEDecode")(latent, models.vae)
    (encoded,) = node("AAAVAEEncode")(images, models.vae)
    assert encoded["samples"].shape == latent["samples"].shape


# --------------------------------------------------------------------------------------
# The bridge's compatibility shims, against stand-ins for the two ComfyUI API generations
# --------------------------------------------------------------------------------------


class _FakePatcher:
    """Does what ComfyUI 0.10's ModelPatcher does to the module it wraps (sets model.device)."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        model.device = offload_device  # fails on a module whose `device` is a read-only property


def _fake_comfy(monkeypatch, load_models_gpu, vae_dtype):
    mm = SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        vae_device=lambda: torch.device("cpu"), vae_offload_device=lambda: torch.device("cpu"),
        text_encoder_device=lambda: torch.device("cpu"), text_encoder_offload_device=lambda: torch.device("cpu"),
        load_models_gpu=load_models_gpu, vae_dtype=vae_dtype,
    )
    monkeypatch.setattr(bridge, "mm", mm)
    monkeypatch.setattr(bridge, "comfy", SimpleNamespace(model_patcher=SimpleNamespace(ModelPatcher=_FakePatcher)), raising=False)


def test_bridge_asks_for_a_full_load_where_comfyui_has_the_parameter(models, monkeypatch):
    calls = []

    def load_models_gpu_2024(models, memory_required=0):
        calls.append(("2024", memory_required))

    def load_models_gpu_current(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
        calls.append(("current", memory_required, force_full_load))

    for load_models_gpu in (load_models_gpu_2024, load_models_gpu_current):
        _fake_comfy(monkeypatch, load_models_gpu, vae_dtype=lambda: torch.float32)
        vae = bridge.ManagedModel(models.vae.model, models.vae.model, bridge.VAE, torch.float32, torch.float32, "vae.safetensors")
        assert vae.patcher.model.inner is models.vae.model  # wrapped: Flux2VAE.device is read-only
        assert vae.load(123) is models.vae.model
    assert calls == [("2024", 123), ("current", 123, True)]


def test_bridge_vae_dtype_uses_the_signature_comfyui_has(monkeypatch):
    _fake_comfy(monkeypatch, None, vae_dtype=lambda device=None, allowed_dtypes=[]: allowed_dtypes[0])
    assert bridge.vae_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert bridge.vae_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice wins
    _fake_comfy(monkeypatch, None, vae_dtype=lambda: torch.float16)
    assert bridge.vae_dtype("auto", torch.device("cpu")) == torch.float16
