"""The example workflow "AAADiT train a LoRA" runs as shipped in a current ComfyUI (skipped on trees without TrainLoraNode).

Its API form trains two steps on the tiny DiT from a folder of image + caption pairs, saves the LoRA
and samples with it: ComfyUI's own dataset, training and LoRA nodes on our MODEL and native CLIP.
The native VAE Loader needs a full-size FLUX.2 VAE (random weights), as in tests/test_native_vae_interop.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from aaa_core.scheduler import TRAINING_MU
from aaa_core.vae import Flux2VAEConfig
from api_workflows import API_WORKFLOWS, HEIGHT, WIDTH, load_workflow
from comfyui_harness import comfyui_test_marks, execute, run_in_comfyui
from test_comfyui_lora_training import tree_has_train_lora_node
from test_native_vae_interop import COMFYUI_ROOT, has_native_flux2_vae
from tiny_models import save_tiny_dit, save_tiny_text_encoder, save_tiny_vae

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = "AAADiT train a LoRA"
DATASET = "lora_dataset"  # the workflow's dataset folder under ComfyUI's input/
VAE_FILE = "flux2_random.safetensors"
TRAIN_STEPS = 2
CAPTIONS = ["a red square on grey", "a blue circle on white"]

pytestmark = comfyui_test_marks()


def shipped_workflow() -> dict:
    return json.loads((API_WORKFLOWS / f"{WORKFLOW}.json").read_text())


def small_workflow(prefix: str, strength: float) -> dict:
    """The shipped graph with tiny models, two fp32 training steps at a rate that visibly moves the model."""
    return load_workflow(
        WORKFLOW, prefix, VAELoader={"vae_name": VAE_FILE}, LoraModelLoader={"strength_model": strength},
        TrainLoraNode={"steps": TRAIN_STEPS, "learning_rate": 0.02, "rank": 2, "training_dtype": "fp32", "lora_dtype": "fp32"},
    )


def write_dataset(folder: Path) -> None:
    """Image + caption pairs the way users drop them into ComfyUI's input folder: a.png beside a.txt."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption, encoding="utf-8")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not tree_has_train_lora_node():
        pytest.skip("this ComfyUI has no TrainLoraNode")
    if not has_native_flux2_vae(COMFYUI_ROOT):
        pytest.skip("this ComfyUI has no native FLUX.2 VAE")
    base = tmp_path_factory.mktemp("comfyui_lora_workflow")
    models = base / "models"
    for folder in ("unet", "vae"):
        (models / folder).mkdir(parents=True)
    save_tiny_dit(models / "unet" / "aaa_tiny.safetensors")
    save_tiny_text_encoder(models / "clip")
    save_tiny_vae(models / "vae" / VAE_FILE, Flux2VAEConfig())
    write_dataset(base / "work" / "input" / DATASET)
    model_paths = {name: models / name for name in ("unet", "clip", "vae")}
    # The second run samples with the LoRA at strength 0 (the base model); training comes from ComfyUI's cache.
    actions = [execute(small_workflow("trained", 1.0)), execute(small_workflow("base", 0.0))]
    return run_in_comfyui(ROOT, actions, base / "work", model_paths=model_paths, timeout=600)


def test_workflow_trains_on_the_reference_training_distribution() -> None:
    (shift,) = [e["inputs"]["shift"] for e in shipped_workflow().values() if e["class_type"] == "ModelSamplingSD3"]
    assert shift == pytest.approx(math.exp(TRAINING_MU), abs=1e-4)


def test_workflow_trains_saves_and_samples_with_the_lora(run: dict) -> None:
    trained, base = run["actions"]
    assert trained["status"] == "success", trained["error"]
    assert base["status"] == "success", base["error"]
    output = Path(run["output_dir"])
    (lora_file,) = [f for f in trained["files"] if f.startswith("loras/")]
    assert lora_file == f"loras/AAADiT_lora_{TRAIN_STEPS}_steps_00001_.safetensors"
    lora = load_file(str(output / lora_file))
    assert any(key.startswith("diffusion_model.blocks.0.") and key.endswith(".lora_up.weight") for key in lora)
    pixels = {}
    for outcome, prefix in ((trained, "trained"), (base, "base")):
        (image,) = [f for f in outcome["files"] if f.startswith(f"{prefix}_")]
        with Image.open(output / image) as picture:
            pixels[prefix] = np.asarray(picture, dtype=int)
    assert pixels["trained"].shape == (HEIGHT, WIDTH, 3)
    assert np.abs(pixels["trained"] - pixels["base"]).max() > 0  # the trained LoRA changed the sample
