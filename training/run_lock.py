"""One trainer per output folder: an OS lock on ``OUTPUT_DIR/run.lock``, held for the whole run.

The main process takes an exclusive, non-blocking lock on the file before anything is written
into the folder and keeps it until ``train`` returns, then deletes the file; it also writes its PID
there, which only serves to name the holder in a refusal. The other processes of a multi-process run learn the main
process's verdict (:func:`lock_output_dir`), so every process of a second trainer refuses before
writing anything. The operating system drops the lock when its process dies, ``kill -9``
included, so the lock of a killed run is simply taken over at the next start.

POSIX: ``fcntl.flock`` (NFS passes it on as a byte-range lock, so several machines sharing the
folder see it; a file system without locking gets a warning and an unlocked run). Windows:
``msvcrt.locking`` on one byte far past the PID, because Windows locks bytes against reads too.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TextIO

from aaa_core.errors import InputError

from .processes import Processes

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
FREE = -1  # the verdict "this run holds the lock", as every process receives it from the main one
UNKNOWN_PID = 0  # held by a process that has not written its PID (yet)
_WINDOWS_LOCK_BYTE = 1 << 20  # past the PID text, which stays readable
_HELD_ON_WINDOWS = {getattr(errno, name) for name in ("EACCES", "EDEADLOCK") if hasattr(errno, name)}
_NO_LOCKING = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS") if hasattr(errno, name)}


class RunLock:
    """This process's lock on a run folder; :meth:`release` (or the process's end) frees it."""

    def __init__(self, path: Path, handle: TextIO | None):
        self.path = path
        self._handle = handle

    @classmethod
    def try_acquire(cls, folder: Path) -> tuple["RunLock | None", int]:
        """Locks ``folder``: ``(lock, FREE)``, or ``(None, holder's PID)`` when another process holds it."""
        path = folder / LOCK_FILE
        while True:
            try:
                handle = open(path, "a+", encoding="ascii")  # "a": never empties the holder's PID before the lock is ours
            except OSError as err:
                raise InputError(f"{path}: cannot be created ({err.strerror or err}); pick another --output-dir") from None
            try:
                if not _lock(handle):
                    handle.close()
                    return None, _read_pid(path)
            except OSError as err:
                if err.errno not in _NO_LOCKING:
                    handle.close()
                    raise InputError(f"{path}: cannot be locked ({err.strerror or err}); pick another --output-dir") from None
                log.warning("%s: this file system cannot lock files (%s); make sure no other trainer uses this folder",
                            path, err.strerror or err)
            if _is_the_file_at(handle, path):
                break
            handle.close()  # its holder deleted it on release between our open and our lock: lock the new one
        previous = _read_pid(path)
        if previous not in (UNKNOWN_PID, os.getpid()):
            log.info("%s: taking over the lock of process %d, which has ended", path, previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return cls(path, handle), FREE

    def release(self) -> None:
        """Deletes the lock file (a refused run leaves its folder as it found it) and frees the lock."""
        if self._handle is None:
            return
        if fcntl is not None:  # deleted while still locked, so no other process can have locked it in between
            _delete_quietly(self.path)
        _unlock(self._handle)
        self._handle.close()
        self._handle = None
        if fcntl is None:  # Windows deletes no open file
            _delete_quietly(self.path)


def lock_output_dir(out: Path, processes: Processes) -> RunLock | None:
    """Creates ``out`` and locks it for this run (main process); every process refuses if another trainer holds it.

    ``processes.main_value`` hands every process the main process's value (a broadcast). Returns the lock on
    the main process, None on the others.
    """
    lock, holder = None, FREE
    if processes.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"{out}: cannot be the output folder ({err.strerror or err}); pick another --output-dir") from None
        lock, holder = RunLock.try_acquire(out)
    holder = processes.main_value(holder)
    if holder != FREE:
        raise InputError(f"{out}: another trainer is running in this folder ({describe(holder)} holds {LOCK_FILE}); "
                         "wait for it to end, or start this run in another --output-dir")
    return lock


def holder_of(folder: Path) -> int | None:
    """The PID of the process that holds ``folder``'s run lock (UNKNOWN_PID if unnamed), or None if none does."""
    path = folder / LOCK_FILE
    try:
        handle = open(path, encoding="ascii")
    except OSError:  # no lock file: no run has locked this folder
        return None
    with handle:
        try:
            if _lock(handle, shared=True):
                _unlock(handle)
                return None
        except OSError:  # a file system without locking: nothing can be said
            return None
        return _read_pid(path)


def check_not_in_running_states(path: Path) -> None:
    """Refuses an output inside the ``states/`` folder of a run that is on: its trainer prunes and replaces states there."""
    for folder in Path(os.path.abspath(path)).resolve().parents:
        holder = holder_of(folder.parent) if folder.name == "states" else None
        if holder is not None:
            raise InputError(f"{path}: is inside {folder}, where the run of {describe(holder)} saves and prunes its "
                             "states; write it elsewhere, or wait until that run ends")


def describe(pid: int) -> str:
    return f"process {pid}" if pid != UNKNOWN_PID else "a process that has not written its PID yet"


def _lock(handle: TextIO, shared: bool = False) -> bool:
    """Tries to lock without waiting; False if another process holds the lock."""
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        else:  # msvcrt has no shared locks; a probe takes the byte and gives it back at once
            handle.seek(_WINDOWS_LOCK_BYTE)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as err:
        # flock says EWOULDBLOCK; msvcrt says EACCES or EDEADLOCK for a byte another process holds.
        if isinstance(err, BlockingIOError) or (fcntl is None and err.errno in _HELD_ON_WINDOWS):
            return False
        raise
    return True


def _unlock(handle: TextIO) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    else:
        handle.seek(_WINDOWS_LOCK_BYTE)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _is_the_file_at(handle: TextIO, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _delete_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError as err:  # the lock is what counts; a leftover file is taken over at the next start
        log.warning("could not delete %s (%s)", path, err.strerror or err)


def _read_pid(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_PID
    return int(text) if text.isdigit() else UNKNOWN_PID
