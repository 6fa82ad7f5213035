"""Tiny models of the real classes, written to real files, shared by the tests.

Widths are small so a whole generation runs in well under a second on a CPU, but every file
has the real key names, so loaders are exercised exactly as with the published weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aaa_core.checkpoint import save_safetensors
from aaa_core.dit import CONFIG_METADATA_KEY, AAADiT, AAADiTConfig

TINY_DIT = AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32)


def save_tiny_dit(path: Path, config: AAADiTConfig = TINY_DIT, seed: int = 0) -> Path:
    """Writes a randomly initialised AAADiT with its config in the metadata, as our trainer does."""
    torch.manual_seed(seed)
    save_safetensors(AAADiT(config).state_dict(), path, {CONFIG_METADATA_KEY: config.to_json()})
    return path
