"""Aspect-ratio buckets: parsing, assignment, the per-bucket batch order, non-square images and sample grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from training.data import load_image


def test_load_image_gives_the_non_square_size_asked_for(tmp_path):
    path = tmp_path / "wide.png"
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (100, 1))  # left black, right white
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(path)
    pixels = load_image(path, 64, 32, torch.float32)
    assert pixels.shape == (3, 32, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # Scaled to 96x32 to cover, the middle 64 columns kept: the edges are a sixth in from black and white.
    assert abs(pixels[:, :, 0].mean() + 2 / 3) < 0.05 and abs(pixels[:, :, -1].mean() - 2 / 3) < 0.05
    tall = load_image(path, 32, 64, torch.float32)
    assert tall.shape == (3, 64, 32) and abs(tall.mean().item()) < 0.05  # the centre column band, mid-grey on average
