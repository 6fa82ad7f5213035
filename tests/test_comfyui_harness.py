"""Proves the ComfyUI harness works, with a tiny probe pack instead of the real nodes.

The probe pack mirrors the real pack's layout: a root `__init__.py` exporting
NODE_CLASS_MAPPINGS and a `nodes/` sub-package that reaches its library with a relative import
(`from ..probe_core import ...`), so ComfyUI's loader and the `nodes` name clash are exercised.
One ComfyUI subprocess runs every action; the tests below check its result.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from PIL import Image

from comfyui_harness import comfyui_test_marks, execute, run_in_comfyui, validate


pytestmark = comfyui_test_marks()

SLOW_STEPS = 40
INTERRUPT_AFTER = 3

PROBE_FILES = {
    "__init__.py": """
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
    """,
    "probe_core/__init__.py": """
        import torch

        def gradient(width, height):
            \"\"\"A [1, H, W, 3] float32 IMAGE in 0..1, brighter to the right.\"\"\"
            ramp = torch.linspace(0.0, 1.0, width).expand(height, width)
            return ramp[None, :, :, None].expand(1, height, width, 3).contiguous()
    """,
    "nodes/__init__.py": """
        import time

        import comfy.model_management
        import comfy.utils

        from ..probe_core import gradient

        class ProbeImage:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {
                    "width": ("INT", {"default": 64, "min": 8, "max": 512}),
                    "height": ("INT", {"default": 64, "min": 8, "max": 512}),
                }}
            RETURN_TYPES = ("IMAGE",)
            FUNCTION = "make"
            CATEGORY = "probe"

            def make(self, width, height):
                return (gradient(width, height),)

        class ProbeSlow:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"image": ("IMAGE",), "steps": ("INT", {"default": 10, "min": 1})}}
            RETURN_TYPES = ("IMAGE",)
            FUNCTION = "run"
            CATEGORY = "probe"

            def run(self, image, steps):
                bar = comfy.utils.ProgressBar(steps)
                for _ in range(steps):
                    time.sleep(0.02)
                    bar.update(1)
                    comfy.model_management.throw_exception_if_processing_interrupted()
                return (image,)

        NODE_CLASS_MAPPINGS = {"ProbeImage": ProbeImage, "ProbeSlow": ProbeSlow}
        NODE_DISPLAY_NAME_MAPPINGS = {"ProbeImage": "Probe Image", "ProbeSlow": "Probe Slow"}
    """,
}


def _write_probe_pack(root: Path) -> Path:
    for relative, source in PROBE_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip())
    return root


def _prompt(width: int, *, slow: bool = False) -> dict:
    prompt = {"1": {"class_type": "ProbeImage", "inputs": {"width": width, "height": 32}}}
    if slow:
        prompt["2"] = {"class_type": "ProbeSlow", "inputs": {"image": ["1", 0], "steps": SLOW_STEPS}}
    prompt["9"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["2" if slow else "1", 0], "filename_prefix": "slow" if slow else "probe"},
    }
    return prompt


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("comfyui")
    pack = _write_probe_pack(base / "probe_pack")
    vae_dir = base / "models" / "vae"
    vae_dir.mkdir(parents=True)
    (vae_dir / "probe_vae.safetensors").write_bytes(b"")
    return run_in_comfyui(
        pack,
        [
            validate(_prompt(width=2)),  # below the input's min of 8
            execute(_prompt(width=48)),
            execute(_prompt(width=48, slow=True), interrupt_after_progress=INTERRUPT_AFTER),
        ],
        base / "work",
        model_paths={"vae": vae_dir},
        timeout=240,
    )


def test_pack_imports_and_registers_its_nodes(run: dict) -> None:
    pack = run["pack"]
    assert pack["imported"], pack["error"]
    assert sorted(pack["node_ids"]) == ["ProbeImage", "ProbeSlow"]
    assert pack["node_problems"] == {}
    info = pack["node_info"]["ProbeImage"]
    assert info["display_name"] == "Probe Image" and info["category"] == "probe"
    assert info["output"] == ["IMAGE"]


def test_model_folders_point_at_test_dirs(run: dict) -> None:
    assert "probe_vae.safetensors" in run["model_files"]["vae"]


def test_bad_input_value_fails_validation_naming_the_input(run: dict) -> None:
    outcome = run["actions"][0]
    assert outcome["valid"] is False
    errors = outcome["node_errors"]["1"]["errors"]
    assert [e["type"] for e in errors] == ["value_smaller_than_min"]
    assert errors[0]["extra_info"]["input_name"] == "width"


def test_prompt_executes_and_save_image_writes_png(run: dict) -> None:
    outcome = run["actions"][1]
    assert outcome["status"] == "success", outcome["error"]
    assert outcome["files"] == ["probe_00001_.png"]
    assert outcome["outputs"]["9"]["images"][0]["filename"] == "probe_00001_.png"
    with Image.open(Path(run["output_dir"]) / "probe_00001_.png") as image:
        assert image.size == (48, 32)


def test_interrupted_run_ends_interrupted_and_stops_early(run: dict) -> None:
    outcome = run["actions"][2]
    assert outcome["status"] == "interrupted", outcome["error"]
    assert outcome["files"] == []
    steps_done = max(update["value"] for update in outcome["progress"])
    assert 0 < steps_done < SLOW_STEPS
