"""Our LATENTs are ComfyUI's native FLUX.2 latents: native VAE Encode/Decode and ours interchange.

Needs a ComfyUI with FLUX.2 support (0.3.72 or later): run with
``AAA_COMFYUI_PATH=/path/to/ComfyUI``. The 2024 snapshot used in CI predates FLUX.2, so there
the test is skipped. It uses a full-size VAE with random weights, because ComfyUI builds the
FLUX.2 VAE with fixed widths (a tiny one does not fit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aaa_core.vae import Flux2VAEConfig
from comfyui_harness import execute, find_comfyui_root, run_in_comfyui
from tiny_models import save_tiny_vae

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_ROOT = find_comfyui_root()


def has_native_flux2_vae(root: Path | None) -> bool:
    formats = root / "comfy" / "latent_formats.py" if root else None
    return bool(formats and formats.is_file() and "class Flux2" in formats.read_text())


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not has_native_flux2_vae(COMFYUI_ROOT), reason="this ComfyUI has no native FLUX.2 VAE"),
]

VAE_FILE = "flux2_random.safetensors"
ROUTES = {  # SaveImage prefix -> (encoder class, decoder class)
    "ours_ours": ("AAAVAEEncode", "AAAVAEDecode"),
    "native_ours": ("VAEEncode", "AAAVAEDecode"),
    "ours_native": ("AAAVAEEncode", "VAEDecode"),
}


def interop_prompt() -> dict:
    """One image encoded and decoded along every route, through both VAE loaders' objects."""
    prompt = {
        "ours": {"class_type": "AAAVAELoader", "inputs": {"vae_name": VAE_FILE, "weight_dtype": "fp32"}},
        "native": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    }
    for prefix, (encoder, decoder) in ROUTES.items():
        prompt[f"{prefix}_enc"] = {"class_type": encoder, "inputs": {"pixels": ["image", 0], "vae": [_loader(encoder), 0]}}
        prompt[f"{prefix}_dec"] = {"class_type": decoder, "inputs": {"samples": [f"{prefix}_enc", 0], "vae": [_loader(decoder), 0]}}
        prompt[f"{prefix}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}_dec", 0], "filename_prefix": prefix}}
    return prompt


def _loader(node_class: str) -> str:
    return "ours" if node_class.startswith("AAA") else "native"


def test_native_and_our_vae_nodes_give_the_same_pixels(tmp_path: Path) -> None:
    models = tmp_path / "vae"
    models.mkdir()
    save_tiny_vae(models / VAE_FILE, Flux2VAEConfig())
    work = tmp_path / "work"
    (work / "input").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(work / "input" / "example.png")

    result = run_in_comfyui(ROOT, [execute(interop_prompt())], work, model_paths={"vae": models}, timeout=600)
    outcome = result["actions"][0]
    assert outcome["status"] == "success", outcome["error"]
    images = {}
    for file in outcome["files"]:
        with Image.open(Path(result["output_dir"]) / file) as image:
            images[Path(file).name.split("_0")[0]] = np.asarray(image, dtype=int)
    assert set(images) == set(ROUTES)
    assert images["ours_ours"].shape == (48, 64, 3)
    for route in ("native_ours", "ours_native"):
        assert np.abs(images[route] - images["ours_ours"]).max() <= 1, route  # PNG rounding only
