"""The example workflows: UI files (Browse Templates lists workflows/*.json) and their API twins.

Widget values are checked against each node's INPUT_TYPES in the order the frontend writes them.
"""

from __future__ import annotations

import json

import pytest

from pack_import import NODES, ROOT, pack_module

WORKFLOWS = ROOT / "workflows"
core_downloads = pack_module("aaa_core.downloads")

# ComfyUI's own definitions of the built-in nodes the workflows use (hidden inputs left out; the
# custom-sampling nodes exist from mid-2024 on, the others in the 2024 tree too; combo lists cut
# to the values used), so this test needs no ComfyUI; the ComfyUI tests run the API files.
BUILTIN_INPUT_TYPES = {
    "SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
    "LoadImage": {"required": {"image": (["example.png"], {"image_upload": True})}},
    "KSampler": {"required": {
        "model": ("MODEL",), "seed": ("INT", {}), "steps": ("INT", {}), "cfg": ("FLOAT", {}),
        "sampler_name": (["euler"],), "scheduler": (["simple"],),
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",), "denoise": ("FLOAT", {}),
    }},
    "CFGGuider": {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "cfg": ("FLOAT", {})}},
    "KSamplerSelect": {"required": {"sampler_name": (["euler"],)}},
    "CLIPTextEncode": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}},
    "SamplerCustomAdvanced": {"required": {
        "noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",), "latent_image": ("LATENT",),
    }},
    "VAELoader": {"required": {"vae_name": (["flux2_vae.safetensors"],)}},
    "VAEDecode": {"required": {"samples": ("LATENT",), "vae": ("VAE",)}},
    "ModelSamplingSD3": {"required": {"model": ("MODEL",), "shift": ("FLOAT", {})}},
    # The dataset and training nodes (current ComfyUI only: tests/test_comfyui_lora_workflow.py runs their workflow).
    "LoadImageTextDataSetFromFolder": {"required": {"folder": (["lora_dataset"],)}},
    "MakeTrainingDataset": {"required": {"images": ("IMAGE",), "vae": ("VAE",), "clip": ("CLIP",)}, "optional": {"texts": ("STRING", {})}},
    "TrainLoraNode": {"required": {
        "model": ("MODEL",), "latents": ("LATENT",), "positive": ("CONDITIONING",), "batch_size": ("INT", {}),
        "grad_accumulation_steps": ("INT", {}), "steps": ("INT", {}), "learning_rate": ("FLOAT", {}), "rank": ("INT", {}),
        "optimizer": (["AdamW"],), "loss_function": (["MSE"],), "seed": ("INT", {}), "training_dtype": (["bf16", "fp32"],),
        "lora_dtype": (["bf16", "fp32"],), "algorithm": (["LoRA"],), "gradient_checkpointing": ("BOOLEAN", {}),
        "existing_lora": (["[None]"],), "bucket_mode": ("BOOLEAN", {}),
    }},
    "SaveLoRA": {"required": {"lora": ("LORA_MODEL",), "prefix": ("STRING", {})}, "optional": {"steps": ("INT", {})}},
    "LoraModelLoader": {"required": {"model": ("MODEL",), "lora": ("LORA_MODEL",), "strength_model": ("FLOAT", {})}},
}
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # never sent to the server, so absent from API files
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WORKFLOW_NAMES = ["AAADiT text to image", "AAADiT image to image", "AAADiT native KSampler", "AAADiT custom sampler", "AAADiT train a LoRA"]


def widget_slots(input_types: dict) -> list[tuple[str, str]]:
    """(input name, what) in the order the frontend writes widgets_values (docs/comfyui.md section 6).

    Widgets follow INPUT_TYPES order, required then optional; only INT/FLOAT/STRING/BOOLEAN/COMBO
    inputs get one. An INT named seed/noise_seed (or flagged control_after_generate) is followed by
    its control value, and an image_upload COMBO by the upload widget's value.
    """
    slots = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                slots.append((name, "value"))
                if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                    slots.append((name, "control"))
                if options.get("image_upload"):
                    slots.append((name, "upload"))
    return slots


def input_types_of(class_type: str) -> dict:
    return NODES[class_type].INPUT_TYPES() if class_type in NODES else BUILTIN_INPUT_TYPES[class_type]


def test_workflow_folders_hold_only_ui_files_at_the_top():
    """ComfyUI lists every workflows/*.json under Browse Templates: only UI-format files may sit there."""
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(WORKFLOW_NAMES)
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == sorted(WORKFLOW_NAMES)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_and_its_api_twin_agree(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert ui["version"] == 0.4 and "ds" in ui["extra"] and ui["groups"] == [] and isinstance(ui["config"], dict)
    links = {link[0]: link for link in ui["links"]}
    assert all(isinstance(link, list) and len(link) == 6 for link in ui["links"])
    assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"]) and ui["last_link_id"] >= max(links)

    server_nodes = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY_NODES]
    assert sorted(str(n["id"]) for n in server_nodes) == sorted(api)
    for n in server_nodes:
        entry = api[str(n["id"])]
        assert entry["class_type"] == n["type"]
        assert n["properties"]["Node name for S&R"] == n["type"]
        for key in ("pos", "size", "flags", "order", "mode", "inputs", "outputs", "widgets_values"):
            assert key in n, (n["type"], key)
        input_types = input_types_of(n["type"])
        specs = {**input_types["required"], **input_types.get("optional", {})}
        expected = {}
        # Widgets: the frontend's order, control and upload values included. A widget fed by a link
        # (an input entry naming it) keeps its value in the UI file; the API file sends the link.
        slots = widget_slots(input_types)
        linked_widgets = {i["widget"]["name"] for i in n["inputs"] if "widget" in i}
        assert linked_widgets <= {name for name, what in slots if what == "value"}, n["type"]
        assert len(n["widgets_values"]) == len(slots), (n["type"], n["widgets_values"], slots)
        for (input_name, what), value in zip(slots, n["widgets_values"]):
            if what == "control":
                assert value in CONTROL_VALUES, (n["type"], value)
            elif what == "upload":
                assert value == "image"
            elif input_name not in linked_widgets:
                expected[input_name] = value
                spec = specs[input_name]
                if isinstance(spec[0], list):
                    assert value in spec[0], (n["type"], input_name, value)
        # Links: each socket input's link ends at this node and slot, and is an API link.
        sockets = {name for name in input_types["required"] if (name, "value") not in slots}
        assert {i["name"] for i in n["inputs"] if "widget" not in i} == sockets
        for slot, socket in enumerate(n["inputs"]):
            link_id, origin, origin_slot, target, target_slot, link_type = links[socket["link"]]
            assert (target, target_slot, link_type) == (n["id"], slot, socket["type"])
            assert link_id in next(o for o in ui["nodes"] if o["id"] == origin)["outputs"][origin_slot]["links"]
            expected[socket["name"]] = [str(origin), origin_slot]
        assert entry["inputs"] == expected, n["type"]


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflows_use_the_official_files_and_reference_settings(name):
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    by_type = {}
    for entry in api.values():
        by_type.setdefault(entry["class_type"], []).append(entry["inputs"])
    assert by_type["AAADiTLoader"][0]["dit_name"] == core_downloads.DIT.local_name
    assert by_type["AAACLIPLoader"][0]["text_encoder_name"] == core_downloads.TEXT_ENCODER.local_name
    assert (by_type.get("AAAVAELoader") or by_type["VAELoader"])[0]["vae_name"] == core_downloads.VAE.local_name
    # AAA Sampler, KSampler, or the custom sampler's guider and sigmas: the reference's 30 steps at cfg 10.
    sampler = (by_type.get("AAASampler") or by_type.get("KSampler") or [{**by_type["CFGGuider"][0], **by_type["AAAFlux2Sigmas"][0]}])[0]
    assert (sampler["steps"], sampler["cfg"]) == (30, 10.0)
    # Prompts the way ComfyUI users write them: CLIP Text Encode on AAA CLIP Loader's native CLIP.
    assert sorted(e["text"] for e in by_type["CLIPTextEncode"]) == [" ", "a green lizard pokemon with a plant bulb on its back"]
    assert "SaveImage" in by_type
    if name != "AAADiT image to image":
        assert by_type["AAAEmptyLatentImage"][0] == {"width": 256, "height": 256, "batch_size": 1} and sampler["denoise"] == 1.0
    else:
        assert by_type["LoadImage"][0] == {"image": "example.png"} and sampler["denoise"] < 1.0
