"""The text chunks of a CLI PNG: ComfyUI's own ``prompt`` and ``workflow``, plus ``parameters``.

ComfyUI's SaveImage stores the API-format graph as ``prompt`` and the UI graph as ``workflow``;
dropping such a PNG on the canvas opens the graph. The CLI's PNGs carry the same two chunks,
built from the shipped example workflows (``workflows/`` and ``workflows/api/``) with this run's
values filled in, so they follow those files when the workflows change. The values are set by
input name (``seed``, ``steps``, ``width``, ``dit_name``, ...) in the API file, and the prompts
through the sampler's ``positive``/``negative`` links; the UI file gets the same values in the
widget slots that held the API file's values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import PngImagePlugin

from .devices import SHORT_NAMES
from .downloads import SOURCES
from .pipeline import GenerationSettings
from .sampling import batch_seed
from .text_encoder import WEIGHTS_NAME

log = logging.getLogger(__name__)

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"
TEXT_TO_IMAGE, IMAGE_TO_IMAGE = "AAADiT text to image", "AAADiT image to image"


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What made an image besides its settings: file names as ComfyUI's loaders list them, dtype, input."""

    dit: str
    text_encoder: str
    vae: str
    weight_dtype: str
    image: str | None = None  # the img2img input, as LoadImage names it (a file in ComfyUI's input/)


def provenance(
    dit: "str | os.PathLike[str] | None",
    text_encoder: "str | os.PathLike[str] | None",
    vae: "str | os.PathLike[str] | None",
    dtype: torch.dtype,
    image: "str | os.PathLike[str] | None" = None,
) -> Provenance:
    """The CLI's model arguments as loader names: a file's name, or the official name for a download."""

    def name(path: "str | os.PathLike[str] | None", key: str) -> str:
        if path is None:
            return SOURCES[key].local_name
        path = Path(path)
        # A Qwen3-0.6B folder inside text_encoders/ lists as FOLDER/model.safetensors.
        return f"{path.name}/{WEIGHTS_NAME}" if path.is_dir() else path.name

    return Provenance(
        dit=name(dit, "dit"), text_encoder=name(text_encoder, "text_encoder"), vae=name(vae, "vae"),
        weight_dtype=SHORT_NAMES[dtype], image=Path(image).name if image is not None else None,
    )


def image_settings(settings: GenerationSettings, index: int) -> GenerationSettings:
    """The settings of image ``index`` of a batch on its own: it was sampled with seed + index (wrapped)."""
    return dataclasses.replace(settings, seed=batch_seed(settings.seed, index), batch_size=1)


def parameters_text(settings: GenerationSettings, index: int, made: Provenance) -> str:
    """The ``parameters`` chunk: the settings with this image's own seed, the files, dtype and input."""
    own = dataclasses.replace(settings, seed=batch_seed(settings.seed, index))
    extra = {"dit": made.dit, "text_encoder": made.text_encoder, "vae": made.vae, "dtype": made.weight_dtype}
    if made.image is not None:
        extra["image"] = made.image
    if settings.batch_size > 1:
        extra["batch_index"] = index
    return ", ".join([own.as_text(), *(f"{key}: {value!r}" for key, value in extra.items())])


def _load(name: str) -> tuple[dict, dict]:
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS_DIR / "api" / f"{name}.json").read_text(encoding="utf-8"))
    return ui, api


def _values(api: dict, settings: GenerationSettings, index: int, made: Provenance) -> dict[str, dict[str, Any]]:
    """node id -> {input name: new value} for the API graph.

    A workflow with a batch_size input regenerates the whole batch (image ``index`` included,
    bit for bit, as ComfyUI's own SaveImage records it); one without (image-to-image) gets this
    image's own seed.
    """
    batched = any("batch_size" in entry["inputs"] for entry in api.values())
    run = settings if batched else image_settings(settings, index)
    by_name = {
        "seed": run.seed, "steps": run.steps, "cfg": run.cfg, "denoise": run.denoise,
        "width": run.width, "height": run.height, "batch_size": run.batch_size,
        "dit_name": made.dit, "text_encoder_name": made.text_encoder, "vae_name": made.vae,
        "weight_dtype": made.weight_dtype,
    }
    if made.image is not None:
        by_name["image"] = made.image
    values = {node_id: {k: v for k, v in by_name.items() if k in entry["inputs"]} for node_id, entry in api.items()}
    for entry in api.values():  # the prompts: the text of whatever feeds the sampler's positive/negative
        for socket, text in (("positive", run.prompt), ("negative", run.negative_prompt)):
            link = entry["inputs"].get(socket)
            if isinstance(link, list) and "text" in api[link[0]]["inputs"]:
                values[link[0]]["text"] = text
    return values


def _fill_ui(ui: dict, api: dict, values: dict[str, dict[str, Any]]) -> dict:
    """The UI graph with ``values`` written into the widget slots that hold the API file's values.

    The UI file lists its widgets in the frontend's order with extra slots (a seed's control
    value, an upload widget); the API file's literal inputs, in order, match a subsequence of
    them, found here by walking both.
    """
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        entry = api.get(str(node["id"]))
        if entry is None or not values.get(str(node["id"])):
            continue
        widgets = node["widgets_values"]
        slot = 0
        for name, value in entry["inputs"].items():
            if isinstance(value, list):  # a link, not a widget
                continue
            while slot < len(widgets) and widgets[slot] != value:
                slot += 1
            if slot == len(widgets):
                raise ValueError(f"{node['type']} (node {node['id']}): no widget holds {name}={value!r}")
            if name in values[str(node["id"])]:
                widgets[slot] = values[str(node["id"])][name]
            slot += 1
    return ui


def comfyui_graphs(settings: GenerationSettings, index: int, made: Provenance) -> tuple[dict, dict]:
    """(API prompt, UI workflow) that regenerate image ``index`` with the pack's nodes."""
    ui, api = _load(IMAGE_TO_IMAGE if made.image is not None else TEXT_TO_IMAGE)
    values = _values(api, settings, index, made)
    filled_ui = _fill_ui(ui, api, values)
    prompt = copy.deepcopy(api)
    for node_id, changes in values.items():
        prompt[node_id]["inputs"].update(changes)
    return prompt, filled_ui


def png_info(settings: GenerationSettings, index: int, made: Provenance) -> PngImagePlugin.PngInfo:
    """The PNG text chunks for image ``index``: ``parameters``, and ComfyUI's ``prompt`` and ``workflow``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(settings, index, made))
    try:
        prompt, workflow = comfyui_graphs(settings, index, made)
    except OSError as err:  # an install without the example workflows still gets its image
        log.warning("no ComfyUI workflow in the PNG: %s", err)
        return info
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    return info
