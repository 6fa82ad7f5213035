"""Throughput and MFU arithmetic, the log window of the training loop, the run's log file, and TensorBoard logging
that degrades to a warning when it is missing."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .progress import Heartbeat

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


class LogWindow:
    """Loss, throughput and MFU over the steps since the last log line, and the heartbeat between lines.

    The clock restarts after every pause that is not training (sample grids, validation, saving),
    so steps/s and MFU measure the training steps alone.
    """

    def __init__(self, heartbeat: Heartbeat, tensorboard: TensorBoard, reduce: Callable[[torch.Tensor, str], torch.Tensor],
                 device: torch.device, samples_per_step: int, flops_per_step: float, peak: float | None, is_main: bool):
        self.heartbeat, self.tensorboard, self.reduce = heartbeat, tensorboard, reduce
        self.samples_per_step, self.flops_per_step, self.peak, self.is_main = samples_per_step, flops_per_step, peak, is_main
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        self.losses: list[tuple[int, float]] = []  # (step, mean loss of the window), for TrainSummary
        self.restart()

    def restart(self) -> None:
        """Starts the clock again (after a pause that is not training)."""
        self.start, self.steps = time.perf_counter(), 0

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-step's loss."""
        self.loss_sum += loss.detach()
        self.loss_count += 1

    def stepped(self) -> None:
        """One optimizer step done."""
        self.steps += 1

    def log(self, step: int, total_steps: int, lr: float, epoch: float, grad_norm: torch.Tensor | None, bar: Any) -> None:
        """The log line of ``step`` (every process: the loss is averaged across them), then a new window."""
        mean_loss = self.reduce(self.loss_sum / self.loss_count, "mean").item()  # also syncs the GPU for timing
        steps_per_s = self.steps / (time.perf_counter() - self.start)
        scalars = {
            "train/loss": mean_loss, "train/lr": lr, "train/epoch": epoch,
            "perf/steps_per_s": steps_per_s, "perf/images_per_s": steps_per_s * self.samples_per_step,
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if self.peak:
            scalars["perf/mfu"] = self.flops_per_step * steps_per_s / self.peak
        self.tensorboard.scalars(scalars, step)
        self.losses.append((step, mean_loss))
        mfu = f" | MFU {100 * scalars['perf/mfu']:.1f}%" if self.peak else ""
        log.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.2f steps/s | %.1f img/s%s", step, total_steps,
                 epoch, mean_loss, lr, steps_per_s, scalars["perf/images_per_s"], mfu)
        bar.set_postfix(loss=f"{mean_loss:.4f}", steps_s=f"{steps_per_s:.2f}")
        self.loss_sum.zero_()
        self.loss_count = 0
        self.restart()
        self.heartbeat.logged()

    def heartbeat_if_due(self, step: int) -> None:
        """A progress line between log lines when a step is long or --log-every large: never silent for long."""
        if self.is_main and self.heartbeat.due():
            log.info("%s", self.heartbeat.line(step, (self.loss_sum / self.loss_count).item()))


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
