"""One output folder, one run: the run's identity, the refusal to mix runs, ``--overwrite``, stale temp files.

While a run is on, ``run_lock.py`` keeps any other trainer out of its folder. ``OUTPUT_DIR/run.json``
names the run that owns the folder (a random id, also written into each of its states and
checkpoints). A fresh run is refused in a folder that holds saved states or checkpoints, because
pruning and ``--resume`` would mix the two runs; ``--resume`` continues the owner (afresh, under
its id, if it saved no state yet), and ``--overwrite`` deletes what the trainer wrote there before
(the encoding cache stays). Temporary files and folders that a killed save left behind are
deleted at every start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from aaa_core.errors import InputError, OutputError
from aaa_core.outputs import check_writable, is_temp_file, sweep_temp_files, write_json_atomic

from .checkpoints import STATE_PATTERN, find_state, list_states, read_progress, state_run_id
from .processes import Processes

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# What the trainer writes into OUTPUT_DIR besides the encoding cache and run.lock, and the names it
# gives the files in each folder: --overwrite deletes these alone, so a user's file there stays.
RUN_FILES = ("train.log", "config.toml", RUN_FILE)
RUN_FOLDERS = {
    "states": STATE_PATTERN,
    "checkpoints": re.compile(r".+-step-\d+\.safetensors"),
    "samples": re.compile(r"step-\d+\.png|prompts\.txt"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
}
RUN_OUTPUTS = (*RUN_FOLDERS, *RUN_FILES)
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


def run_to_continue(out: Path, resume: str) -> tuple[Path | None, str | None]:
    """The state a run continues from and the id it runs under: None, None for a fresh run.

    A ``--resume`` whose run has no state yet (it was stopped or killed before its first one)
    starts that run afresh under its own id, so the outputs it left count as its own.
    """
    if not resume:
        return None, None
    owner = folder_run_id(out)
    state = find_state(resume, out / "states", owner)
    return state, read_progress(state)["run_id"] if state else owner


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
    processes: Processes = Processes(),
) -> str:
    """Makes ``out`` the folder of run ``run_id`` (a resumed run) or of a new run (``None``); returns the id.

    Call it with the folder checked (:func:`check_output_dir`) and locked (``run_lock.py``). Every
    process checks before any of them changes a file, so all refuse together. Then the main
    process deletes the previous run's outputs (``overwrite``), sweeps temporary files and writes
    run.json, and every process reads the id back from it.
    """
    if overwrite:
        _check_written_by_a_trainer(out)
    owned = run_id is not None and folder_run_id(out) == run_id
    previous = [] if owned else saved_outputs(out)
    if previous and not overwrite:
        raise InputError(
            f"{out}: already holds {len(previous)} saved states or checkpoints of another run (e.g. "
            f"{previous[-1].relative_to(out)}); continue that run with --resume, start this one in another "
            "--output-dir, or pass --overwrite to delete that run's outputs and start afresh"
        )
    processes.barrier()
    if processes.is_main:
        if overwrite:
            _delete_previous_run(out)
        for folder in TEMP_FOLDERS:
            for path in sweep_temp_files(out / folder):
                log.info("deleted %s (left by an interrupted save)", path)
        write_json_atomic(out / RUN_FILE, {"run_id": run_id or uuid.uuid4().hex})
    processes.barrier()
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
    except FileNotFoundError:  # only ever on another process than the main one, which has just written it
        raise InputError(
            f"{out}: this process does not see the {RUN_FILE} that the main process wrote there; with several "
            "machines, --output-dir must be on a disk all of them share"
        ) from None


def check_output_dir(out: Path) -> None:
    """Refuses an output folder the run could not create or write into; creates nothing (call on every process)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: cannot be the output folder (a file has that name); pick another --output-dir")
    if not out.exists():
        try:
            check_writable([out / RUN_FILE])
        except OutputError as err:
            raise InputError(f"{out}: cannot be the output folder ({err.reason}); pick another --output-dir") from None
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output folder is not writable; pick another --output-dir")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.exists() and path.is_dir() != (name in RUN_FOLDERS):
            expected = "a folder" if name in RUN_FOLDERS else "a file"
            raise InputError(f"{path}: the trainer writes {expected} here; move it away or pick another --output-dir")


def _check_written_by_a_trainer(out: Path) -> None:
    """``--overwrite`` acts only where run.json or a training state says a trainer wrote the files it would delete."""
    if folder_run_id(out) is not None or list_states(out / "states"):
        return
    found = [name for name in RUN_OUTPUTS if os.path.lexists(out / name)]
    if found:
        raise InputError(f"{out}: --overwrite deletes only what the trainer wrote, but no {RUN_FILE} or training state "
                         f"says a trainer wrote {', '.join(found)}; move them away or pick another --output-dir")


def _delete_previous_run(out: Path) -> None:
    """Deletes the previous run's files by the trainer's own names; anything else in its folders stays."""
    for name in RUN_FILES:
        _delete(out / name)
    for name, pattern in RUN_FOLDERS.items():
        folder = out / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in sorted(folder.iterdir()):
            if pattern.fullmatch(path.name):
                _delete(path)
        if not any(folder.iterdir()):
            folder.rmdir()


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    else:
        return
    log.warning("--overwrite: deleted %s", path)
