"""Checks and messages for user files that cannot be read as files: FIFOs, devices, text that is not UTF-8.

Opening a named pipe for reading blocks until another process writes to it, so a FIFO given as a
model, an image, a config or a metadata CSV would hang the run with no message; a device such
as ``/dev/zero`` reads without end. Every reader of user files asks :func:`special_file_kind` first.
"""

from __future__ import annotations

import os
import stat

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_file_kind(path: "str | os.PathLike[str]") -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder, else ``None``.

    A missing or unreadable path gives ``None``: the caller's own open reports that case.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for is_kind, name in _SPECIAL_KINDS if is_kind(mode)), None)


def not_a_file_message(path: "str | os.PathLike[str]", kind: str, expected: str) -> str:
    """The one-line message for a special file found where ``expected`` (e.g. "a .safetensors file") was wanted."""
    return f"{path}: is {kind}, not a regular file; expected {expected}"


def not_utf8_message(path: "str | os.PathLike[str]", err: UnicodeDecodeError, expected: str) -> str:
    """The one-line message for a text file (JSON, TOML) that is not UTF-8, naming the first bad byte."""
    return f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at {err.start}); expected {expected}"
