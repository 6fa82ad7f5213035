"""ComfyUI's own LoRA training on AAADiT (current ComfyUI; skipped on trees without TrainLoraNode).

TrainLoraNode trains a few steps on the tiny DiT, with ModelSamplingSD3 at the reference's training
shift e^0.8 so its noise levels follow the reference's training grid rather than the sampling shift
(README, "Training a LoRA inside ComfyUI"); SaveLoRA writes the file. That file (LoRA pairs plus
``.diff``/``.diff_b``) then gives the same samples through AAA LoRA Loader as through LoraLoaderModelOnly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from comfyui_harness import comfyui_test_marks, execute, find_comfyui_root, run_in_comfyui
from test_native_model_in_comfyui import add_ksampler, base_prompt, latents, links, missing_node, save_latent
from tiny_models import save_tiny_models

from aaa_core.scheduler import TRAINING_MU

ROOT = Path(__file__).resolve().parents[1]
TRAINED = "aaa_trained_3_steps_00001_.safetensors"  # SaveLoRA's name for prefix loras/aaa_trained after 3 steps

pytestmark = comfyui_test_marks()


def train_prompt() -> dict:
    prompt = base_prompt()
    sockets = links(prompt)
    prompt["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": sockets["model"], "shift": math.exp(TRAINING_MU)}}
    prompt["train"] = {"class_type": "TrainLoraNode", "inputs": {
        "model": ["shift", 0], "latents": sockets["latent_image"], "positive": sockets["positive"], "batch_size": 1,
        "grad_accumulation_steps": 1, "steps": 3, "learning_rate": 0.02, "rank": 2, "optimizer": "AdamW", "loss_function": "MSE",
        "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False,
        "existing_lora": "[None]", "bucket_mode": False}}
    prompt["save"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/aaa_trained", "steps": ["train", 3]}}
    return prompt


def apply_prompt() -> dict:
    prompt = base_prompt()
    model = links(prompt)["model"]
    lora = {"model": model, "lora_name": TRAINED, "strength_model": 1.0}
    prompt["native"] = {"class_type": "LoraLoaderModelOnly", "inputs": lora}
    prompt["ours"] = {"class_type": "AAALoraLoader", "inputs": lora}
    for name, source in (("base", model), ("native", ["native", 0]), ("ours", ["ours", 0])):
        save_latent(prompt, add_ksampler(prompt, f"k_{name}", source), f"trained_{name}")
    return prompt


def tree_has_train_lora_node() -> bool:
    """Whether the ComfyUI tree defines TrainLoraNode, read from its source so a tree without it skips without booting ComfyUI."""
    root = find_comfyui_root()
    return root is not None and any("class TrainLoraNode" in path.read_text(encoding="utf-8", errors="replace")
                                    for path in (root / "comfy_extras").glob("nodes_train*.py"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not tree_has_train_lora_node():
        pytest.skip("this ComfyUI has no TrainLoraNode")
    base = tmp_path_factory.mktemp("comfyui_lora_training")
    models = base / "models"
    save_tiny_models(models)
    model_paths = {name: models / name for name in ("unet", "clip", "vae")}
    model_paths["loras"] = base / "work" / "output" / "loras"  # where SaveLoRA writes
    return run_in_comfyui(ROOT, [execute(train_prompt()), execute(apply_prompt())], base / "work", model_paths=model_paths, timeout=400)


def test_train_lora_node_file_gives_the_same_model_in_both_loaders(run: dict) -> None:
    trained, applied = run["actions"]
    if missing_node(trained):
        pytest.skip("this ComfyUI has no TrainLoraNode")
    assert trained["status"] == "success", trained["error"]
    assert trained["files"] == [f"loras/{TRAINED}"]
    assert applied["status"] == "success", applied["error"]
    base, ours = latents(run, applied, "trained_base"), latents(run, applied, "trained_ours")
    assert (ours - base).abs().max() > 1e-4  # three steps changed the model ...
    torch.testing.assert_close(ours, latents(run, applied, "trained_native"), rtol=1e-5, atol=1e-5)  # ... the same in both loaders
