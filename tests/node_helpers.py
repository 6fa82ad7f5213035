"""Helpers for the node tests: the pack's modules as ComfyUI sees them, progress and Cancel."""

from __future__ import annotations

from pathlib import Path

import torch

from pack_import import import_pack, pack_module

pack = import_pack()
bridge = pack_module("nodes.comfy_bridge")
model_files = pack_module("nodes.model_files")
errors = pack_module("aaa_core.errors")
core_downloads = pack_module("aaa_core.downloads")


def model_dirs(root: Path) -> dict[str, list[Path]]:
    """The fallback's folder lookup for tiny models written by ``tiny_models.save_tiny_models(root)``."""
    return {name: [root / name] for name in ("unet", "vae", "clip")}


def embeds(conditioning) -> torch.Tensor:
    return conditioning[0][0]


def record_progress(monkeypatch, interrupt_after: int | None = None) -> list:
    """Installs a progress hook like ComfyUI's server; optionally presses Cancel after N updates."""
    updates = []

    def hook(value, total, preview):
        updates.append((value, total))
        if len(updates) == interrupt_after:
            bridge.request_interrupt()

    monkeypatch.setattr(bridge, "progress_hook", hook)
    return updates


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message
