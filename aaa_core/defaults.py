"""The reference's generation settings, the defaults of the CLI, the nodes and the trainer's sample grids.

They are what the reference tutorial samples with (docs/diffsynth-aaa.md section 8: 256x256,
30 steps, cfg 10, negative " ", seed i).
"""

STEPS = 30
CFG = 10.0
SIZE = 256  # pixels per side; step-600000 was trained and is sampled at 256x256
NEGATIVE_PROMPT = " "  # a single space, as the reference tutorial samples
SEED = 0
IMG2IMG_DENOISE = 0.6  # the CLI's strength when an --image is given
