"""CLI PNGs carry ComfyUI's own ``prompt``/``workflow`` chunks and a ``parameters`` line that says
what made each image; the embedded graph, run by ComfyUI's real executor, paints the same pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aaa_core import png_metadata
from aaa_core.cli import main
from aaa_core.pipeline import GenerationSettings
from comfyui_harness import comfyui_test_marks, execute, run_in_comfyui
from test_workflows import input_types_of, widget_slots
from tiny_models import save_tiny_models

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, STEPS = 64, 48, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cli_images(models, tmp_path_factory) -> dict[str, list[Path]]:
    """A text-to-image batch of two and an image-to-image run, written by the CLI with the tiny models."""
    out = tmp_path_factory.mktemp("cli")
    files = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])]
    common = ["--steps", str(STEPS), "--cfg", "4", "--width", str(WIDTH), "--height", str(HEIGHT), *files]
    assert main(["generate", "--prompt", "red dragon", "--negative-prompt", "blurry", "--seed", "7",
                 "--batch-size", "2", *common, "--output", str(out / "t2i.png")]) == 0
    source = out / "my input.png"  # already the output size, so resizing it is the identity
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(source)
    assert main(["generate", "--prompt", "blue bird", "--seed", "3", "--image", str(source), "--denoise", "0.5",
                 *common, "--output", str(out / "i2i.png")]) == 0
    return {"t2i": [out / "t2i_0.png", out / "t2i_1.png"], "i2i": [out / "i2i.png"], "source": [source]}


def chunks(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def by_class(prompt: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for entry in prompt.values():
        found.setdefault(entry["class_type"], []).append(entry["inputs"])
    return found


def test_parameters_name_the_files_dtype_and_each_images_own_seed(cli_images):
    first, second = (chunks(path)["parameters"] for path in cli_images["t2i"])
    assert "seed: 7," in first and "seed: 8," in second and "batch_index: 1" in second
    for text in (first, second):
        assert "'red dragon'" in text and "negative_prompt: 'blurry'" in text and "batch_size: 2" in text
        assert "dit: 'aaa_tiny.safetensors'" in text and "vae: 'flux2_tiny.safetensors'" in text
        assert "text_encoder: 'qwen3_tiny.safetensors'" in text and "dtype: 'fp32'" in text
    i2i = chunks(cli_images["i2i"][0])["parameters"]
    assert "image: 'my input.png'" in i2i and "denoise: 0.5" in i2i and "batch_index" not in i2i


def test_embedded_api_prompt_holds_this_runs_values(cli_images):
    prompt = json.loads(chunks(cli_images["t2i"][1])["prompt"])
    nodes = by_class(prompt)
    assert nodes["AAADiTLoader"] == [{"dit_name": "aaa_tiny.safetensors", "weight_dtype": "fp32"}]
    assert nodes["AAACLIPLoader"] == [{"text_encoder_name": "qwen3_tiny.safetensors", "weight_dtype": "fp32"}]
    assert nodes["AAAVAELoader"] == [{"vae_name": "flux2_tiny.safetensors", "weight_dtype": "fp32"}]
    assert nodes["AAAEmptyLatentImage"] == [{"width": WIDTH, "height": HEIGHT, "batch_size": 2}]
    sampler = nodes["AAASampler"][0]
    # The whole batch, from its base seed: image 1 comes out bit for bit, as in ComfyUI's own PNGs.
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["denoise"]) == (7, STEPS, 4.0, 1.0)
    assert prompt[sampler["positive"][0]]["inputs"]["text"] == "red dragon"
    assert prompt[sampler["negative"][0]]["inputs"]["text"] == "blurry"

    i2i = by_class(json.loads(chunks(cli_images["i2i"][0])["prompt"]))
    assert i2i["LoadImage"] == [{"image": "my input.png"}]
    assert (i2i["AAASampler"][0]["seed"], i2i["AAASampler"][0]["denoise"]) == (3, 0.5)


@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_embedded_ui_workflow_shows_the_same_values_as_the_api_prompt(cli_images, kind):
    """What the canvas opens queues the embedded prompt: every widget slot holds the prompt's value."""
    text = chunks(cli_images[kind][-1])
    prompt, workflow = json.loads(text["prompt"]), json.loads(text["workflow"])
    checked = 0
    for ui_node in workflow["nodes"]:
        entry = prompt.get(str(ui_node["id"]))
        if entry is None:
            continue
        slots = widget_slots(input_types_of(ui_node["type"]))
        for (name, what), value in zip(slots, ui_node["widgets_values"]):
            if what == "value":
                assert entry["inputs"][name] == value, (ui_node["type"], name)
                checked += 1
    assert checked >= 14


def test_graphs_follow_the_shipped_workflow_files(tmp_path, monkeypatch):
    """The chunks are built from workflows/: a changed shipped file changes what the PNG carries."""
    for sub in ("", "api"):
        (tmp_path / sub).mkdir(exist_ok=True)
        shutil.copy(ROOT / "workflows" / sub / "AAADiT text to image.json", tmp_path / sub)
    api_path = tmp_path / "api" / "AAADiT text to image.json"
    api = json.loads(api_path.read_text())
    save = next(entry for entry in api.values() if entry["class_type"] == "SaveImage")
    save["inputs"]["filename_prefix"] = "renamed"
    api_path.write_text(json.dumps(api))
    monkeypatch.setattr(png_metadata, "WORKFLOWS_DIR", tmp_path)
    made = png_metadata.provenance(None, None, None, torch.bfloat16)
    prompt, _ = png_metadata.comfyui_graphs(GenerationSettings(prompt="x"), 0, made)
    nodes = by_class(prompt)
    assert nodes["SaveImage"][0]["filename_prefix"] == "renamed"
    # No model arguments: the official files the CLI downloaded, under the names the loaders offer.
    assert nodes["AAADiTLoader"] == [{"dit_name": "aaa_dit_step-600000.safetensors", "weight_dtype": "bf16"}]


def test_missing_workflow_files_still_write_the_image_with_its_parameters(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(png_metadata, "WORKFLOWS_DIR", tmp_path / "absent")
    made = png_metadata.provenance(None, None, None, torch.float32)
    info = png_metadata.png_info(GenerationSettings(prompt="x"), 0, made)
    keys = [chunk[0] for chunk in info.chunks]
    assert keys == [b"tEXt"] and b"parameters" in info.chunks[0][1]
    assert "no ComfyUI workflow in the PNG" in caplog.text


def test_comfyui_executor_runs_the_embedded_prompts_to_the_same_pixels(cli_images, models, tmp_path):
    """Loading a CLI PNG's graph into ComfyUI's executor regenerates the CLI's images exactly."""
    work = tmp_path / "work"
    (work / "input").mkdir(parents=True)
    shutil.copy(cli_images["source"][0], work / "input")
    actions = []
    for kind in ("t2i", "i2i"):
        prompt = json.loads(chunks(cli_images[kind][0])["prompt"])
        next(e for e in prompt.values() if e["class_type"] == "SaveImage")["inputs"]["filename_prefix"] = kind
        actions.append(execute(prompt))
    folders = {"unet": models["dit"].parent, "clip": models["text_encoder"].parent, "vae": models["vae"].parent}
    run = run_in_comfyui(ROOT, actions, work, model_paths=folders, timeout=240)
    for outcome, kind in zip(run["actions"], ("t2i", "i2i")):
        assert outcome["status"] == "success", outcome["error"]
        assert len(outcome["files"]) == len(cli_images[kind])
        for produced, expected in zip(outcome["files"], cli_images[kind]):
            comfy_pixels = np.array(Image.open(Path(run["output_dir"]) / produced))
            assert np.array_equal(comfy_pixels, np.array(Image.open(expected))), (kind, produced)


for _mark in comfyui_test_marks():  # a real ComfyUI tree, else skipped
    test_comfyui_executor_runs_the_embedded_prompts_to_the_same_pixels = _mark(
        test_comfyui_executor_runs_the_embedded_prompts_to_the_same_pixels
    )
