"""Every LoRA layout ComfyUI applies to AAADiT gives the same model through AAA LoRA Loader, inside ComfyUI.

One ComfyUI process (the 2024 tree by default, `$AAA_COMFYUI_PATH` for another, e.g. 0.10) samples,
per layout of ``lora_formats``, the tiny DiT with the file applied by ComfyUI's LoraLoaderModelOnly
(where that tree maps the layout for this model), by AAA LoRA Loader, and as the checkpoint
``python -m training.export`` merges from the file. All three must agree within 1e-5 and differ
from the base model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_harness import comfyui_test_marks, execute, run_in_comfyui
from lora_formats import COMFY_2024, COMFY_CURRENT, FORMATS
from test_native_model_in_comfyui import add_ksampler, base_prompt, latents, links, save_latent
from tiny_models import TINY_DIT, save_tiny_models

from aaa_core.dit import AAADiT
from aaa_core.lora import parameter_shapes
from training.export import export_lora

ROOT = Path(__file__).resolve().parents[1]
STRENGTH = 0.7

pytestmark = comfyui_test_marks()


def layout_prompt(layout: str) -> dict:
    """KSampler on the base, on the file through each loader, and on the merged checkpoint."""
    prompt = base_prompt()
    model = links(prompt)["model"]
    lora = {"model": model, "lora_name": f"{layout}.safetensors", "strength_model": STRENGTH}
    prompt["native"] = {"class_type": "LoraLoaderModelOnly", "inputs": lora}
    prompt["ours"] = {"class_type": "AAALoraLoader", "inputs": lora}
    prompt["merged"] = {"class_type": "AAADiTLoader", "inputs": {"dit_name": f"merged_{layout}.safetensors", "weight_dtype": "fp32"}}
    for name, source in (("base", model), ("native", ["native", 0]), ("ours", ["ours", 0]), ("merged", ["merged", 0])):
        save_latent(prompt, add_ksampler(prompt, f"k_{name}", source), f"{layout}_{name}")
    return prompt


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("comfyui_lora_files")
    models = base / "models"
    paths = save_tiny_models(models)
    (models / "loras").mkdir()
    shapes = parameter_shapes(AAADiT(TINY_DIT))
    for layout, write in FORMATS.items():
        lora_file = models / "loras" / f"{layout}.safetensors"
        save_file(write(shapes)[0], str(lora_file))
        export_lora(lora_file, models / "unet" / f"merged_{layout}.safetensors", str(paths["dit"]), STRENGTH, "fp32")
    actions = [execute(layout_prompt(layout)) for layout in FORMATS]
    return run_in_comfyui(ROOT, actions, base / "work", model_paths={name: models / name for name in ("unet", "clip", "vae", "loras")},
                          timeout=400)


@pytest.mark.parametrize("layout", list(FORMATS))
def test_aaa_lora_loader_gives_comfyuis_model_for_every_layout(run: dict, layout: str) -> None:
    outcome = run["actions"][list(FORMATS).index(layout)]
    assert outcome["status"] == "success", outcome["error"]
    base, ours = latents(run, outcome, f"{layout}_base"), latents(run, outcome, f"{layout}_ours")
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the result...
    # ... as the export's merge of the same file does ...
    torch.testing.assert_close(ours, latents(run, outcome, f"{layout}_merged"), rtol=1e-5, atol=1e-5)
    # ... and as ComfyUI's own loader does, where this tree maps the layout for AAADiT.
    if layout in (COMFY_2024 if run["comfyui_version"] is None else COMFY_CURRENT):
        torch.testing.assert_close(ours, latents(run, outcome, f"{layout}_native"), rtol=1e-5, atol=1e-5)
