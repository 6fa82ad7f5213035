"""What a run writes to disk: ComfyUI-loadable weights and complete, atomic training states.

- ``checkpoints/<run>-step-NNNNNN.safetensors``: exactly ``AAADiT.state_dict()``'s keys (the
  published file's, section 4.2 of docs/diffsynth-aaa.md), in ``save_dtype``, with the model config,
  the step and which weights (``ema`` or ``raw``) in the metadata. With EMA on it holds the EMA
  weights, the ones to sample with; the raw weights stay in the training states.
- ``states/step-NNNNNN/``: everything a resumed run needs to continue bit for bit: raw and EMA
  weights in full precision (``model``/``ema.safetensors``), AdamW and LR-scheduler states
  (``optimizer``/``lr_scheduler.safetensors``), every process's RNG states
  (``rng-rankR.safetensors``), and ``progress.json`` (format, run id, step, config, data
  fingerprint). Nothing is pickled (``state_files.py``), so a state someone hands you cannot run
  code. It is written into a hidden temporary folder that is renamed into place only when
  complete, so a crash or Ctrl-C during a save never leaves a half-written state; the newest
  complete one of this folder's run is what ``--resume`` finds.
- A LoRA run (``--lora-rank``, ``lora.py``) writes ``checkpoints/<run>-lora-step-NNNNNN.safetensors``
  instead, and its states hold the adapters alone; ``progress.json`` records the rank, alpha,
  targets and the base checkpoint's SHA-256, which a resume must match.

``python -m training.export STATE_DIR OUT.safetensors --weights raw`` turns any state into a
loadable file (for example the raw weights of an EMA run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from aaa_core.checkpoint import check_state_dict_matches, save_safetensors
from aaa_core.devices import DTYPES
from aaa_core.outputs import check_not_an_input, temp_path_for
from aaa_core.dit import CONFIG_METADATA_KEY, AAADiTConfig
from aaa_core.errors import AAAError, InputError

from .distributed import full_optimizer_state, full_state_dict, load_full_state_dict, load_optimizer_state
from .lora import LoraRun
from .processes import Processes
from .state_files import DAMAGED, load_tree, read_state_tensors, save_tree

log = logging.getLogger(__name__)

STATE_PATTERN = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"  # written last: a state folder without it is not a state
# Version of the state folder's layout, in progress.json. 1 (no entry): pickled .pt files, no
# longer read; 2: safetensors only, with the run id.
STATE_FORMAT = 2
SAVE_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp32")}
# Options that change the numbers a resumed run computes; a change is allowed but warned about.
RESUME_SENSITIVE = (
    "resolution", "buckets", "encoder_dtype", "batch_size", "grad_accum", "lr", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_eps", "warmup", "warmup_steps", "max_grad_norm", "ema_decay", "precision", "reference_timesteps",
    "seed",
)  # the LoRA options must not change at all (lora.check_state_kind)


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    config: AAADiTConfig,
    step: int,
    weights: str,
    dtype: torch.dtype,
    run_id: str = "",
) -> Path:
    """Writes a strictly loadable AAADiT file atomically (keys unchanged, floats cast to ``dtype``)."""
    tensors = {k: v.detach().to(dtype) for k, v in state_dict.items()}
    save_safetensors(tensors, path, weights_metadata(config, step, weights, run_id))
    return path


def weights_metadata(config: AAADiTConfig, step: int, weights: str, run_id: str = "") -> dict[str, str]:
    """The metadata of a loadable checkpoint: the model config (its head count included), step, which weights."""
    metadata = {CONFIG_METADATA_KEY: config.to_json(), "aaa_step": str(step), "aaa_weights": weights}
    if run_id:
        metadata["aaa_run_id"] = run_id
    return metadata


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers (the python and numpy tuples taken apart)."""
    version, python_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
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
    processes: Processes = Processes(),
) -> Path:
    """Writes a complete training state (called on every process), then keeps this run's newest ``keep``.

    ``progress`` must hold the ``run_id``: pruning and replacing touch only that run's states.
    Sharded (FSDP) weights and moments are gathered from every process and written full by rank 0.
    """
    run_id, main, barrier = progress["run_id"], processes.is_main, processes.barrier
    final = states_dir / f"step-{step:06d}"
    tmp = temp_path_for(final, shared=True)  # the same name on every process; is_temp_file() knows it
    if final.exists() and state_run_id(final) != run_id:  # checked on every process, so all stop together
        raise InputError(f"{final}: belongs to another run; not replacing it (start this run in another --output-dir)")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        tmp.mkdir(parents=True)
    barrier()
    save_tree(_rng_state(), tmp / f"rng-rank{processes.rank}.safetensors")
    weights = full_state_dict(model, keep=main)
    ema_weights = full_state_dict(ema, keep=main) if ema is not None else None
    optimizer_state = full_optimizer_state(optimizer, keep=main)
    if main:
        save_safetensors(weights, tmp / "model.safetensors")
        if ema_weights is not None:
            save_safetensors(ema_weights, tmp / "ema.safetensors")
        save_tree(optimizer_state, tmp / "optimizer.safetensors")
        save_tree(lr_scheduler.state_dict(), tmp / "lr_scheduler.safetensors")
        record = {"state_format": STATE_FORMAT, **progress}
        (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    barrier()
    if main:
        if final.exists():  # the same step saved before (a resumed run re-saving): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in run_states(states_dir, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


class RunSaver:
    """Saves a run at a step: the training state first, then the checkpoint (its loadable weights).

    The state first: a run killed between the two leaves a state whose checkpoint ``--resume``
    writes (:meth:`write_missing_checkpoint`), never a checkpoint that no state continues.
    Call on every process (FSDP gathers the weights from all of them); the main process writes.
    """

    def __init__(self, out: Path, run_id: str, cfg: Any, trained: torch.nn.Module, ema: torch.nn.Module | None,
                 optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                 model_config: AAADiTConfig, lora: LoraRun | None, data_fingerprint: str, processes: Processes):
        self.out, self.run_id, self.cfg, self.trained, self.ema = out, run_id, cfg, trained, ema
        self.optimizer, self.lr_scheduler, self.model_config, self.lora = optimizer, lr_scheduler, model_config, lora
        self.data_fingerprint, self.processes = data_fingerprint, processes
        self.run_name = out.resolve().name
        # What the newest save of this run wrote (the checkpoint's path on the main process only).
        self.saved_step: int | None = None
        self.saved_checkpoint: Path | None = None
        self.saved_state: Path | None = None

    def checkpoint_path(self, step: int) -> Path:
        return self.out / "checkpoints" / f"{self.run_name}{'-lora' if self.lora else ''}-step-{step:06d}.safetensors"

    def checkpoint(self, step: int) -> Path | None:
        """The loadable weights of ``step``: the EMA if there is one (the path on the main process, else None)."""
        weights, kind = (self.ema, "ema") if self.ema is not None else (self.trained, "raw")
        is_main, dtype = self.processes.is_main, SAVE_DTYPES[self.cfg.save_dtype]
        full_weights = full_state_dict(weights, keep=is_main)  # gathered from every process under FSDP
        checkpoint = self.checkpoint_path(step)
        if is_main and self.lora:
            self.lora.save(weights, checkpoint, step, kind, dtype, self.run_id)
        elif is_main:
            save_weights(full_weights, checkpoint, self.model_config, step, kind, dtype, self.run_id)
        return checkpoint if is_main else None

    def resumed_at(self, step: int) -> None:
        """Records the resumed state of ``step`` as saved, and writes its checkpoint if the run stopped before that."""
        self.saved_step = step
        if not self.checkpoint_path(step).exists():  # every process asks before the main one writes
            log.info("writing the checkpoint of step %d, which the run stopped before writing", step)
            self.checkpoint(step)

    def save(self, step: int) -> None:
        """The state, then the checkpoint of ``step``; keeps the newest ``--keep-states`` states of this run."""
        log.info("step %d: saving the training state and the weights", step)
        progress = {
            "run_id": self.run_id, "step": step, "model_config": self.model_config.to_json(),
            "config": dataclasses.asdict(self.cfg), "data_fingerprint": self.data_fingerprint,
            "world_size": self.processes.world_size, "lora": self.lora.settings if self.lora else None,
        }
        state_dir = save_state(self.out / "states", step, self.trained, self.ema, self.optimizer, self.lr_scheduler,
                               progress, self.cfg.keep_states, self.processes)
        checkpoint = self.checkpoint(step)
        log.info("step %d: saved %s and %s", step, state_dir, checkpoint or "weights")
        self.saved_step, self.saved_checkpoint, self.saved_state = step, checkpoint, state_dir


def list_states(states_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    if not states_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in states_dir.iterdir()
        if (m := STATE_PATTERN.match(p.name)) and (p / PROGRESS_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def state_run_id(state: Path) -> str | None:
    """The run a state belongs to; None for states of the older format or with a damaged progress.json."""
    try:
        return read_progress(state).get("run_id")
    except InputError as err:
        log.warning("%s", err)
        return None


def run_states(states_dir: Path, run_id: str | None) -> list[Path]:
    """The complete states of one run, oldest first."""
    return [s for s in list_states(states_dir) if run_id is not None and state_run_id(s) == run_id]


def find_state(resume: str, states_dir: Path, run_id: str | None) -> Path | None:
    """The state to resume from: for ``latest`` the newest of run ``run_id`` (None if it has none yet), or a given folder."""
    if resume == "latest":
        states = list_states(states_dir)
        mine = run_states(states_dir, run_id)
        if not mine and states:
            check_state_format(states[-1])  # a folder of the older format: say so instead of starting afresh
        return mine[-1] if mine else None
    path = Path(resume).expanduser()
    if not (path / PROGRESS_FILE).is_file():
        raise InputError(f"{path}: not a training state folder (no {PROGRESS_FILE}); states are in OUTPUT_DIR/states/step-N")
    check_state_format(path)
    return path


def read_progress(state: Path) -> dict[str, Any]:
    """A state's progress record (JSON); a damaged one is a one-line InputError naming it."""
    path = state / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {state} is not a training state") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); {DAMAGED}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(progress, dict):
        raise InputError(f"{path}: holds {type(progress).__name__}, expected a JSON object; {DAMAGED}")
    return progress


def check_state_format(state: Path) -> dict[str, Any]:
    """The progress record of a state this version can resume; older or newer layouts are a one-line InputError."""
    progress = read_progress(state)
    found = progress.get("state_format", 1)
    if found == STATE_FORMAT:
        step, run_id = progress.get("step"), progress.get("run_id")
        if not (isinstance(step, int) and step >= 0 and isinstance(run_id, str) and run_id):
            raise InputError(f"{state / PROGRESS_FILE}: needs a step (integer >= 0) and a run_id (text), "
                             f"found {step!r} and {run_id!r}; {DAMAGED}")
        state_model_config(state, progress)
        return progress
    if isinstance(found, int) and found < STATE_FORMAT:
        raise InputError(
            f"state {state} was written by an older version of the trainer (format {found}: pickled files, which are "
            f"not read because loading them can run code); start a fresh run (--overwrite or another --output-dir), "
            f"or keep its weights: python -m training.export {state} raw.safetensors --weights raw, then --init-from raw.safetensors"
        )
    raise InputError(f"state {state} has format {found!r}, this trainer reads format {STATE_FORMAT}; update the trainer")


def state_model_config(state: Path, progress: dict[str, Any] | None = None) -> AAADiTConfig:
    """The DiT sizes a state was saved with (its progress record's ``model_config``)."""
    progress = read_progress(state) if progress is None else progress
    try:
        return AAADiTConfig(**json.loads(progress["model_config"]))
    except (AAAError, KeyError, TypeError, ValueError) as err:  # missing, not JSON, not an object, unknown or bad sizes
        raise InputError(f"{state / PROGRESS_FILE}: no usable model_config ({type(err).__name__}: {err}); {DAMAGED}") from None


def load_state(
    state: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict[str, Any]:
    """Restores everything ``save_state`` wrote (into already built objects); returns the progress record.

    Only safetensors and JSON are read. A missing, damaged or unfitting file is a one-line
    InputError naming it.
    """
    progress = check_state_format(state)
    device = next(model.parameters()).device
    _load_weights(model, state / "model.safetensors", device)
    if ema is not None:
        if (state / "ema.safetensors").is_file():
            _load_weights(ema, state / "ema.safetensors", device)
        else:
            log.warning("%s has no EMA weights; the EMA starts from the current weights", state)
            ema.load_state_dict(model.state_dict())
    for apply, name, on in ((functools.partial(load_optimizer_state, optimizer), "optimizer", device),
                            (lr_scheduler.load_state_dict, "lr_scheduler", "cpu")):
        path = state / f"{name}.safetensors"
        _restore(apply, load_tree(path, on), path, f"the {name} state")
    _check_optimizer_shapes(optimizer, state / "optimizer.safetensors")
    rng_file = state / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        _restore(_set_rng_state, load_tree(rng_file), rng_file, "RNG states")
    else:
        log.warning("%s has no RNG state for process %d (was it saved with fewer processes?)", state, rank)
    return progress


def warn_on_changes(progress: dict, cfg: Any, fingerprint: str, world: int, state: Path) -> None:
    """Warns about each option, the data or the process count that differs from when ``state`` was saved."""
    saved = progress.get("config", {})
    for name in RESUME_SENSITIVE:
        if name in saved and saved[name] != getattr(cfg, name):
            log.warning("%s changed since %s was saved (%r -> %r): the run will differ from an uninterrupted one",
                        name, state, saved[name], getattr(cfg, name))
    if progress.get("data_fingerprint") != fingerprint:
        log.warning("the training data changed since %s was saved: the data order differs from an uninterrupted run", state)
    if progress.get("world_size", world) != world:
        log.warning("%s was saved with %d processes, now %d: batches and noise differ from an uninterrupted run",
                    state, progress["world_size"], world)


def _load_weights(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    weights, _ = read_state_tensors(path, device)
    try:
        check_state_dict_matches(model, weights, path)
    except AAAError as err:
        raise InputError(f"{err}; {DAMAGED}") from None
    load_full_state_dict(model, weights)


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Per-parameter moments must have their parameter's shape (load_state_dict does not check; the next step would fail)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise InputError(f"{path}: {key} has shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(param.shape)}; {DAMAGED}")


def _restore(apply: Callable[[Any], Any], tree: Any, path: Path, what: str) -> None:
    """``apply(tree)``; a structure that does not fit is a one-line error naming the file, not a torch traceback."""
    try:
        apply(tree)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: does not hold {what} this run can use ({reason}); {DAMAGED}") from None


def export_weights(state: Path, output: Path, weights: str = "ema", dtype: str = "bf16") -> Path:
    """Writes a state's raw or EMA weights as a ComfyUI-loadable file (never over one of the state's own files)."""
    check_not_an_input([output], {f"the state {state}": state})
    progress = read_progress(state)
    if progress.get("lora"):
        raise InputError(f"{state}: is a LoRA run's state; its LoRA files are in OUTPUT_DIR/checkpoints, and "
                         "python -m training.export LORA.safetensors OUT.safetensors --base BASE merges one into a checkpoint")
    source = state / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    if not source.is_file():
        raise InputError(f"{state}: has no {weights} weights ({source.name} missing)")
    tensors, _ = read_state_tensors(source)
    config = state_model_config(state, progress)
    return save_weights(tensors, output, config, progress.get("step", 0), weights, SAVE_DTYPES[dtype], progress.get("run_id", ""))


