"""One output folder, one run: the run's identity, the refusal to mix runs, ``--overwrite``, stale temp files.

``OUTPUT_DIR/run.json`` names the run that owns the folder (a random id, also written into each
of its states and checkpoints). A fresh run is refused in a folder that holds saved states or
checkpoints, because pruning and ``--resume`` would mix the two runs; ``--resume`` continues the
owner, and ``--overwrite`` deletes what the trainer wrote there before (the encoding cache stays).
Temporary files and folders that a killed save left behind are deleted at every start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from aaa_core.outputs import is_temp_file, sweep_temp_files, write_json_atomic
from aaa_core.errors import InputError

from .checkpoints import list_states, state_run_id

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# What --overwrite deletes: everything the trainer writes into OUTPUT_DIR except the encoding cache.
RUN_FOLDERS = ("states", "checkpoints", "samples", "tensorboard")
RUN_FILES = ("train.log", "config.toml", RUN_FILE)
RUN_OUTPUTS = RUN_FOLDERS + RUN_FILES
TEMP_FOLDERS = (".", "states", "checkpoints", "samples")  # where atomic writes put their temporary files


def folder_run_id(out: Path) -> str | None:
    """The run that owns ``out``: the id in run.json, else that of its newest state (None if neither)."""
    try:
        run_id = json.loads((out / RUN_FILE).read_text(encoding="utf-8")).get("run_id")
        if isinstance(run_id, str) and run_id:
            return run_id
    except (OSError, ValueError, AttributeError):  # absent or damaged: fall back to the states
        pass
    states = list_states(out / "states")
    return state_run_id(states[-1]) if states else None


def saved_outputs(out: Path) -> list[Path]:
    """The states and checkpoints in ``out`` (complete or not, any run), temporary files aside."""
    found = []
    for folder, pattern in (("states", "*"), ("checkpoints", "*.safetensors")):
        found += sorted(p for p in (out / folder).glob(pattern) if not is_temp_file(p))
    return found


def claim_output_dir(
    out: Path,
    run_id: str | None,
    overwrite: bool,
    is_main: bool,
    barrier: Callable[[], None] = lambda: None,
) -> str:
    """Makes ``out`` the folder of run ``run_id`` (a resumed run) or of a new run (``None``); returns the id.

    Every process checks before any of them changes a file, so all refuse together. Then the main
    process deletes the previous run's outputs (``overwrite``), sweeps temporary files and writes
    run.json, and every process reads the id back from it.
    """
    _check_usable(out, overwrite)
    owned = run_id is not None and folder_run_id(out) == run_id
    previous = [] if owned else saved_outputs(out)
    if previous and not overwrite:
        raise InputError(
            f"{out}: already holds {len(previous)} saved states or checkpoints of another run (e.g. "
            f"{previous[-1].relative_to(out)}); continue that run with --resume, start this one in another "
            "--output-dir, or pass --overwrite to delete that run's outputs and start afresh"
        )
    barrier()
    if is_main:
        if overwrite:
            _delete_previous_run(out)
        for folder in TEMP_FOLDERS:
            for path in sweep_temp_files(out / folder):
                log.info("deleted %s (left by an interrupted save)", path)
        write_json_atomic(out / RUN_FILE, {"run_id": run_id or uuid.uuid4().hex})
    barrier()
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
    except FileNotFoundError:  # only ever on another process than the main one, which has just written it
        raise InputError(
            f"{out}: this process does not see the {RUN_FILE} that the main process wrote there; with several "
            "machines, --output-dir must be on a disk all of them share"
        ) from None


def _check_usable(out: Path, overwrite: bool) -> None:
    """Creates ``out``; refuses one the run could not write into (checked on every process, before any writes)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot be the output folder ({err.strerror or err}); pick another --output-dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output folder is not writable; pick another --output-dir")
    for name in () if overwrite else RUN_OUTPUTS:  # --overwrite deletes whatever is there
        path = out / name
        if path.exists() and path.is_dir() != (name in RUN_FOLDERS):
            expected = "a folder" if name in RUN_FOLDERS else "a file"
            raise InputError(f"{path}: the trainer writes {expected} here; move it away or pick another --output-dir")


def _delete_previous_run(out: Path) -> None:
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        log.warning("--overwrite: deleted %s", path)
