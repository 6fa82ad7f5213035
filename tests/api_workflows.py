"""The shipped API workflows made small for the executor tests: tiny model files, few steps, a small size."""

from __future__ import annotations

import json
from pathlib import Path

API_WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows" / "api"
TINY_FILES = {"dit_name": "aaa_tiny.safetensors", "text_encoder_name": "qwen3_tiny.safetensors", "vae_name": "flux2_tiny.safetensors"}
STEPS, WIDTH, HEIGHT = 2, 64, 48
STEP_NODES = ("KSampler", "AAASampler", "AAAFlux2Sigmas")  # the nodes with a steps input
SIZE_NODES = ("AAAEmptyLatentImage", "AAAFlux2Sigmas")  # ... and with width and height


def load_workflow(name: str, prefix: str, **changes: dict) -> dict:
    """``workflows/api/NAME.json`` with the tiny models, STEPS steps and WIDTH x HEIGHT; its image goes to
    SaveImage ``prefix``, and ``changes`` set further inputs by class (``AAASampler={"steps": 20}``)."""
    prompt = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    for entry in prompt.values():
        inputs = entry["inputs"]
        for key in TINY_FILES.keys() & inputs.keys():
            inputs[key] = TINY_FILES[key]
        if entry["class_type"] in STEP_NODES:
            inputs["steps"] = STEPS
        if entry["class_type"] in SIZE_NODES:
            inputs.update(width=WIDTH, height=HEIGHT)
        if entry["class_type"] == "SaveImage":
            inputs["filename_prefix"] = prefix
        inputs.update(changes.get(entry["class_type"], {}))
    return prompt
