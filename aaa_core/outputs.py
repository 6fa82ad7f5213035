"""Writing output files safely: checks before any work, atomic writes, and temp files that can be swept.

With :func:`atomic_outputs` (the CLI's PNGs, safetensors files, the trainer's small files) the
writer fills a private temp folder beside the target, and the file is renamed to its final
name only once it is complete. The temp folder also catches a writer's own temp files
(safetensors writes through one), so nothing else is left when a run is killed.

Temp folders are named ``.<first 40 characters of the name>.<pid>-<8 hex>.aaa-tmp``: short, so a
target name near the file system's limit still works, and recognisable, so
:func:`sweep_temp_files` can remove those of a killed run (and no file of anyone else). A temp
is stale when the process that made it is gone (on Windows, where that cannot be asked safely,
when it is over a day old).
Any OS error becomes a one-line :class:`OutputError` that names the target and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import OutputError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".aaa-tmp"
_NAME_PART = 40  # characters of the target's name kept in its temp name, for a human reading a listing
_TEMP_NAME = re.compile(r"\..*?(?:\.(\d+)-[0-9a-f]{8})?" + re.escape(TEMP_SUFFIX), re.DOTALL)
_STALE_AFTER_S = 24 * 3600  # where the writer's pid cannot be checked (Windows)

_PERMISSION = "no permission to write there: write elsewhere or fix the folder's permissions"
_A_FILE_IN_THE_WAY = "a part of the path is a file, not a folder"
_REASONS = {
    getattr(errno, name): reason
    for name, reason in (
        ("ENOSPC", "the disk is full: free some space or write elsewhere"),
        ("EDQUOT", "the disk quota is used up: free some space or write elsewhere"),
        ("EROFS", "the file system is read-only: write elsewhere"),
        ("EACCES", _PERMISSION),
        ("EPERM", _PERMISSION),
        ("ENAMETOOLONG", "the name is too long for this file system: use a shorter one"),
        ("EISDIR", "a folder has that name: use a file name"),
        ("ENOTDIR", _A_FILE_IN_THE_WAY),
        ("EEXIST", _A_FILE_IN_THE_WAY),  # what mkdir says when a parent is a file
    )
    if hasattr(errno, name)  # EDQUOT is not defined on Windows
}


def temp_path_for(path: "str | os.PathLike[str]", shared: bool = False) -> Path:
    """A temp name beside ``path`` that :func:`is_temp_file` recognises.

    Fresh for every call (it names this process), unless ``shared``: then it is the same in
    every process, for a folder that several processes fill together (the trainer's states).
    """
    path = Path(path)
    unique = "" if shared else f".{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name[:_NAME_PART]}{unique}{TEMP_SUFFIX}")


def is_temp_file(path: "str | os.PathLike[str]") -> bool:
    """True if ``path`` is named like a temp of :func:`temp_path_for` (file or folder)."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def sweep_temp_files(folder: "str | os.PathLike[str]") -> list[Path]:
    """Removes the temps (files or folders) that killed runs left directly inside ``folder``; returns them.

    Call it before this process writes there. A temp that names another process still
    running is left alone, so two runs can share an output folder; shared temps name no
    process and are always removed. A folder that does not exist or cannot be listed has
    nothing to sweep.
    """
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        if is_temp_file(entry) and _is_stale(entry):
            _remove_quietly(entry)
            if not os.path.lexists(entry):
                removed.append(entry)
    return removed


def _is_stale(temp: Path) -> bool:
    pid = _TEMP_NAME.fullmatch(temp.name).group(1)
    if pid is None or int(pid) == os.getpid():  # shared, or an earlier process with our pid (containers reuse them)
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        try:
            return time.time() - temp.lstat().st_mtime > _STALE_AFTER_S
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # the process exists but belongs to someone else
        return False
    return False


def check_writable(paths: Iterable["str | os.PathLike[str]"]) -> None:
    """Raises a one-line :class:`OutputError` if any of ``paths`` could not be written.

    Meant to run before any slow work. Missing parent folders are fine (writing creates them),
    but the nearest existing one must be a folder this process can create files in, which is
    tried with an empty temp file. Creates nothing that outlives the call. A full disk is only
    found when writing.
    """
    for path in map(Path, paths):
        try:
            _check_one(path)
        except OSError as err:
            raise OutputError(path, _reason(err)) from None


def _check_one(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    missing = [path.name]
    folder = path.parent.absolute()
    while not folder.exists():
        missing.append(folder.name)
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    longest = max(len(os.fsencode(name)) for name in missing)
    if longest > _name_max(folder):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    probe = temp_path_for(folder / path.name)
    with open(probe, "xb"):
        pass
    probe.unlink()


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf on Windows
        return 255


@contextlib.contextmanager
def atomic_outputs(paths: Sequence["str | os.PathLike[str]"]) -> Iterator[list[Path]]:
    """Yields one temp file path per target; renames them all to their targets only if the block succeeds.

    A crash, Ctrl-C or exception while writing leaves no partial file behind, existing files
    stay intact until every new one is complete, and a batch is all or nothing (only a failing
    rename itself, after every file was written, could leave part of it). Missing parent
    folders are created. OS errors become one-line :class:`OutputError`s naming the target.
    """
    targets = [Path(path) for path in paths]
    folders: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            folder = temp_path_for(target)
            folders.append(folder)
            folder.mkdir()
        temps = [folder / target.name for folder, target in zip(folders, targets)]
        yield temps
        mode = _default_file_mode()
        for temp in temps:
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(temp, mode)  # some writers (safetensors) create files 0600
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
    except OSError as err:
        raise OutputError(_target_of(err, folders, targets), _reason(err)) from None
    finally:
        for folder in folders:
            _remove_quietly(folder)


@contextlib.contextmanager
def atomic_output(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """:func:`atomic_outputs` for one file: yields its temp path."""
    with atomic_outputs([path]) as (temp,):
        yield temp


def write_text_atomic(path: "str | os.PathLike[str]", text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` through a temp file and a rename: readers never see half of it."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: "str | os.PathLike[str]", value: object, indent: int | None = None) -> None:
    """:func:`write_text_atomic` of ``value`` as JSON, one trailing newline."""
    write_text_atomic(path, json.dumps(value, indent=indent) + "\n")


def _target_of(err: OSError, folders: list[Path], targets: list[Path]) -> "Path | str":
    """The target an OS error is about: the one whose temp it names, else the only or first one."""
    filename = Path(err.filename) if err.filename else None
    for folder, target in zip(folders, targets):
        if filename is not None and (filename == target or folder in (filename, *filename.parents)):
            return target
    return targets[0] if len(targets) == 1 else f"{targets[0]} (and {len(targets) - 1} more)"


def _reason(err: OSError) -> str:
    return _REASONS.get(err.errno) or err.strerror or str(err)


def _remove_quietly(path: Path) -> None:
    """Deletes a temp file or folder; a failure is logged, never raised over the error being handled."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove the temp %s (%s); delete it by hand", path, err.strerror or err)


def _default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
