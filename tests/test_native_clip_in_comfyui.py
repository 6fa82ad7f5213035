"""AAA CLIP Loader's native CLIP inside ComfyUI's real executor: CLIP Text Encode equals AAA Text Encode.

One ComfyUI process (the 2024 tree by default, `$AAA_COMFYUI_PATH` for another) loads a tiny Qwen3
with the real tokenizer files beside it, in fp32 and in bf16, through both loaders, and encodes a
short, an empty and an over-long prompt with native CLIP Text Encode and with AAA Text Encode. The
harness captures every CONDITIONING. KSampler on our MODEL then samples with the CLIP's
conditioning exactly as with AAA Text Encode's, and CLIP Set Last Layer is refused in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_harness import comfyui_test_marks, execute, read_captured, run_in_comfyui
from tiny_models import TINY_DIT, reference_tokenizer_dir, save_tiny_models

ROOT = Path(__file__).resolve().parents[1]

pytestmark = comfyui_test_marks()

PROMPTS = {
    "short": "a green lizard pokemon with a plant bulb on its back",
    "empty": "",
    "long": "a very long description of a pokemon, " * 40,  # over 128 tokens: cut, template tail included
}
DTYPES = {"fp32": {"rtol": 0.0, "atol": 1e-4}, "bf16": {"rtol": 1.6e-2, "atol": 1e-5}}  # bf16: its rounding
ENCODER_FILE = "qwen3_tiny.safetensors"


def encoders_prompt() -> dict:
    """Both loaders in both precisions, and each prompt through CLIP Text Encode and AAA Text Encode."""
    prompt = {}
    for dtype in DTYPES:
        loader_inputs = {"text_encoder_name": ENCODER_FILE, "weight_dtype": dtype}
        prompt[f"clip_{dtype}"] = {"class_type": "AAACLIPLoader", "inputs": loader_inputs}
        prompt[f"te_{dtype}"] = {"class_type": "AAATextEncoderLoader", "inputs": loader_inputs}
        for name, text in PROMPTS.items():
            prompt[f"native_{dtype}_{name}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [f"clip_{dtype}", 0], "text": text}}
            prompt[f"aaa_{dtype}_{name}"] = {"class_type": "AAATextEncode", "inputs": {"text_encoder": [f"te_{dtype}", 0], "text": text}}
    prompt["dit"] = {"class_type": "AAADiTLoader", "inputs": {"dit_name": "aaa_tiny.safetensors", "weight_dtype": "fp32"}}
    prompt["latent"] = {"class_type": "AAAEmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}}
    for encode in ("native", "aaa"):  # KSampler on our MODEL with each node's conditioning
        prompt[f"k_{encode}"] = {"class_type": "KSampler", "inputs": {
            "model": ["dit", 0], "positive": [f"{encode}_fp32_short", 0], "negative": [f"{encode}_fp32_empty", 0],
            "latent_image": ["latent", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        prompt[f"save_{encode}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"k_{encode}", 0], "filename_prefix": f"latents/{encode}"}}
    return prompt


def last_layer_prompt() -> dict:
    """CLIP Set Last Layer -2 before CLIP Text Encode: another hidden state than AAADiT was trained on."""
    prompt = encoders_prompt()
    prompt["last_layer"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["clip_fp32", 0], "stop_at_clip_layer": -2}}
    prompt["native_fp32_short"]["inputs"]["clip"] = ["last_layer", 0]
    del prompt["k_aaa"], prompt["save_aaa"]
    return prompt


ENCODE_NODES = [f"{encode}_{dtype}_{name}" for encode in ("native", "aaa") for dtype in DTYPES for name in PROMPTS]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("comfyui_clip")
    models = base / "models"
    save_tiny_models(models)
    for file in reference_tokenizer_dir().iterdir():  # the real tokenizer beside the weights, as in Qwen/Qwen3-0.6B
        shutil.copy(file, models / "clip" / file.name)
    actions = [execute(encoders_prompt(), capture=ENCODE_NODES), execute(last_layer_prompt())]
    return run_in_comfyui(ROOT, actions, base / "work", model_paths={name: models / name for name in ("unet", "clip", "vae")})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", PROMPTS)
def test_clip_text_encode_equals_aaa_text_encode(run: dict, dtype: str, name: str) -> None:
    outcome = run["actions"][0]
    assert outcome["status"] == "success", outcome["error"]
    ((native, native_options),) = read_captured(outcome, f"native_{dtype}_{name}")
    ((aaa, aaa_options),) = read_captured(outcome, f"aaa_{dtype}_{name}")
    assert native.shape == aaa.shape == (1, 128, TINY_DIT.text_dim) and native.dtype == aaa.dtype == torch.float32
    assert native_options == aaa_options == {"pooled_output": repr(torch.zeros(1, 0))}  # JSON holds a tensor's repr
    torch.testing.assert_close(native, aaa, **DTYPES[dtype])


def test_prompts_give_different_conditioning(run: dict) -> None:
    """The comparison above is not trivially true: each prompt's embedding is its own."""
    outcome = run["actions"][0]
    embeds = [read_captured(outcome, f"native_fp32_{name}")[0][0] for name in PROMPTS]
    for index, first in enumerate(embeds):
        for second in embeds[index + 1 :]:
            assert (first - second).abs().max() > 1e-3


def test_ksampler_on_our_model_samples_the_clips_conditioning_like_aaa_text_encodes(run: dict) -> None:
    outcome = run["actions"][0]
    latents = {}
    for encode in ("native", "aaa"):
        (name,) = [f for f in outcome["files"] if f.startswith(f"latents/{encode}_")]
        latents[encode] = load_file(str(Path(run["output_dir"]) / name))["latent_tensor"]
    assert latents["aaa"].shape == (1, 128, 3, 4) and latents["aaa"].abs().max() > 0.1
    torch.testing.assert_close(latents["native"], latents["aaa"], rtol=1e-5, atol=1e-5)


def test_clip_set_last_layer_is_refused_in_one_line(run: dict) -> None:
    outcome = run["actions"][1]
    assert outcome["status"] == "error" and outcome["files"] == []
    assert outcome["error"].startswith("CLIPTextEncode (node native_fp32_short): ")
    assert "CLIP Set Last Layer -2: AAADiT was trained on the last hidden state" in outcome["error"]
    assert "\n" not in dict(outcome["messages"])["execution_error"]["exception_message"].strip()
