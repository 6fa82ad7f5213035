"""What a run writes to disk: ComfyUI-loadable weights and complete, atomic training states.

- ``checkpoints/<run>-step-NNNNNN.safetensors``: exactly ``AAADiT.state_dict()``'s keys (the
  published file's, section 4.2 of docs/diffsynth-aaa.md), in ``save_dtype``, with the model config,
  the step and which weights (``ema`` or ``raw``) in the metadata. With EMA on it holds the EMA
  weights, the ones to sample with; the raw weights stay in the training states.
- ``states/step-NNNNNN/``: everything a resumed run needs to continue bit for bit: raw and EMA
  weights in full precision, AdamW and LR-scheduler states, every process's RNG states, and
  ``progress.json`` (step, config, data fingerprint). It is written into a hidden temporary
  folder that is renamed into place only when complete, so a crash or Ctrl-C during a save
  never leaves a half-written state; the newest complete one is what ``--resume`` finds.

``python -m training.export STATE_DIR OUT.safetensors --weights raw`` turns any state into a
loadable file (for example the raw weights of an EMA run).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from aaa_core.checkpoint import atomic_output, read_safetensors, save_safetensors
from aaa_core.dit import CONFIG_METADATA_KEY, AAADiTConfig
from aaa_core.errors import InputError

log = logging.getLogger(__name__)

STATE_PATTERN = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"  # written last: a state folder without it is not a state
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    config: AAADiTConfig,
    step: int,
    weights: str,
    dtype: torch.dtype,
) -> Path:
    """Writes a strictly loadable AAADiT file atomically (keys unchanged, floats cast to ``dtype``)."""
    tensors = {k: v.detach().to(dtype) for k, v in state_dict.items()}
    metadata = {CONFIG_METADATA_KEY: config.to_json(), "aaa_step": str(step), "aaa_weights": weights}
    save_safetensors(tensors, path, metadata)
    return path


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    states_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    keep: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Writes a complete training state (called on every process), then keeps the newest ``keep``."""
    final = states_dir / f"step-{step:06d}"
    tmp = states_dir / f".step-{step:06d}.tmp"  # the same name on every process
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_safetensors(model.state_dict(), tmp / "model.safetensors")
        if ema is not None:
            save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=1), encoding="utf-8")
    barrier()
    if rank == 0:
        if final.exists():  # the same step saved before (a resumed run re-saving): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_states(states_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_states(states_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    if not states_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in states_dir.iterdir()
        if (m := STATE_PATTERN.match(p.name)) and (p / PROGRESS_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def find_state(resume: str, states_dir: Path) -> Path | None:
    """The state to resume from: the newest one for ``latest`` (None if there is none yet), or a given folder."""
    if resume == "latest":
        states = list_states(states_dir)
        return states[-1] if states else None
    path = Path(resume).expanduser()
    if not (path / PROGRESS_FILE).is_file():
        raise InputError(f"{path}: not a training state folder (no {PROGRESS_FILE}); states are in OUTPUT_DIR/states/step-N")
    return path


def read_progress(state: Path) -> dict[str, Any]:
    return json.loads((state / PROGRESS_FILE).read_text(encoding="utf-8"))


def load_state(
    state: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict[str, Any]:
    """Restores everything ``save_state`` wrote (into already built objects); returns the progress record."""
    device = next(model.parameters()).device
    weights, _ = read_safetensors(state / "model.safetensors", device=device)
    model.load_state_dict(weights)
    if ema is not None:
        if (state / "ema.safetensors").is_file():
            ema.load_state_dict(read_safetensors(state / "ema.safetensors", device=device)[0])
        else:
            log.warning("%s has no EMA weights; the EMA starts from the current weights", state)
            ema.load_state_dict(model.state_dict())
    optimizer.load_state_dict(torch.load(state / "optimizer.pt", map_location=device, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(state / "lr_scheduler.pt", weights_only=True))
    rng_file = state / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))  # python/numpy states are plain tuples
    else:
        log.warning("%s has no RNG state for process %d (was it saved with fewer processes?)", state, rank)
    return read_progress(state)


def export_weights(state: Path, output: Path, weights: str = "ema", dtype: str = "bf16") -> Path:
    """Writes a state's raw or EMA weights as a ComfyUI-loadable file."""
    progress = read_progress(state)
    source = state / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    if not source.is_file():
        raise InputError(f"{state}: has no {weights} weights ({source.name} missing)")
    tensors, _ = read_safetensors(source)
    config = AAADiTConfig(**json.loads(progress["model_config"]))
    return save_weights(tensors, output, config, progress["step"], weights, SAVE_DTYPES[dtype])


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
