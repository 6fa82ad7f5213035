"""Throughput and MFU arithmetic, the run's log file, and TensorBoard logging that degrades to a warning when it is missing."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets.
# Matched as whole words against torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first. --peak-flops overrides the table.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (reported as "H100 80GB HBM3")
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """The accelerator's peak bf16 FLOP/s, or None where unknown (the CPU, an unlisted GPU)."""
    if override > 0:
        return override
    if device.type != "cuda":
        name = f"the {device.type} device"  # a CPU's peak depends on cores, clock and vector units
    else:
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS:
            if re.search(rf"\b{re.escape(key)}\b", name):
                return flops
    log.info("no peak FLOP/s known for %s; pass --peak-flops to log MFU", name)
    return None


def training_flops_per_sample(model: torch.nn.Module, image_tokens: int, text_tokens: int, frozen: bool = False) -> float:
    """Forward + backward matmul FLOPs for one sample: 3 x forward (nanoGPT / PaLM convention).

    With ``frozen`` weights (LoRA training) the backward computes no weight gradients: 2 x forward
    (the small adapters are not counted). Gradient-checkpointing recomputation is not counted, as usual for MFU.
    """
    return (2 if frozen else 3) * model.flops_per_forward(image_tokens, text_tokens)


class TensorBoard:
    """A SummaryWriter on the main process; a no-op elsewhere or when tensorboard is not installed."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            log.warning("tensorboard is not installed (pip install tensorboard); training continues without its logs")
            return
        self.writer = SummaryWriter(str(folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """``image``: a PIL image."""
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


LOGGERS = ("training", "aaa_core")  # what train.log records


def log_to_file(path: Path, is_main: bool) -> logging.Handler | None:
    """Also logs to OUTPUT_DIR/train.log (main process only; the others log warnings alone)."""
    if not is_main:
        logging.getLogger("training").setLevel(logging.WARNING)
        return None
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")  # non-UTF-8 paths as \udcff
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return handler


def stop_logging_to_file(handler: logging.Handler | None) -> None:
    """Undoes ``log_to_file`` when ``train`` returns, so a caller's next run logs to its own file."""
    if handler is not None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
