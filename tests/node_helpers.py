"""Helpers for the node tests: the pack's modules as ComfyUI sees them, model folders, progress and Cancel."""

from __future__ import annotations

from pathlib import Path

import torch

from pack_import import import_pack, pack_module

pack = import_pack()
bridge = pack_module("nodes.comfy_bridge")
model_files = pack_module("nodes.model_files")
errors = pack_module("aaa_core.errors")
core_downloads = pack_module("aaa_core.downloads")

import comfy.model_management  # noqa: E402  (on sys.path once the pack is imported)
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

MODEL_FOLDERS = ("unet", "vae", "clip", "loras")


def model_dirs(root: Path) -> dict[str, list[Path]]:
    """ComfyUI model folders for tiny models written by ``tiny_models.save_tiny_models(root)``."""
    return {name: [root / name] for name in MODEL_FOLDERS}


def use_model_dirs(monkeypatch, folders: dict[str, list[Path]]) -> None:
    """Points ComfyUI's model folder types at ``folders`` for one test, as ``extra_model_paths.yaml`` would.

    Current ComfyUI keeps the legacy names (unet, clip) as aliases of diffusion_models and
    text_encoders; its file-list cache is emptied so the new directories are read.
    """
    for name, dirs in folders.items():
        key = folder_paths.map_legacy(name) if hasattr(folder_paths, "map_legacy") else name
        extensions = folder_paths.folder_names_and_paths[key][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, key, ([str(path) for path in dirs], extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})


def embeds(conditioning) -> torch.Tensor:
    return conditioning[0][0]


def record_progress(monkeypatch, interrupt_after: int | None = None) -> list:
    """Installs a progress hook as ComfyUI's server does; optionally presses Cancel after N updates."""
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append((value, total))
        if len(updates) == interrupt_after:
            comfy.model_management.interrupt_current_processing(True)  # what the UI's Cancel button does

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return updates


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message
