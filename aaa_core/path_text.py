"""Paths that are not UTF-8: names the OS accepts, which some writers and libraries do not.

On Linux a file name is bytes; Python hands the bytes that are not UTF-8 over as lone surrogates
(``os.fsdecode(b"\\xff")`` is ``"\\udcff"``), which the OS takes back unchanged but UTF-8 text
cannot hold. Two tools, so that such a path works wherever the OS would take it:

- :func:`utf8_alias` for libraries that take a path only as UTF-8 (safetensors, in Rust): a
  symbolic link with a plain name in a private temp folder stands in for the path;
- :func:`path_text` for text written into files (PNG and safetensors metadata, ``config.toml``):
  the undecodable bytes written as ``\\xff`` escapes, so the text shows which bytes they were.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def is_utf8(text: str) -> bool:
    """True if ``text`` can be written as UTF-8 (it holds no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_text(path: "str | os.PathLike[str]") -> str:
    """``path`` as UTF-8-safe text: unchanged when it is UTF-8, else with ``\\xNN`` for each byte that is not."""
    text = os.fspath(path)
    return text if is_utf8(text) else os.fsencode(text).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def utf8_alias(path: "str | os.PathLike[str]") -> Iterator[str]:
    """Yields a UTF-8 name for ``path`` (a file or folder, existing or not): itself, or a link to it while the block runs.

    A link to a folder lets a writer create files in it, renames included, under plain names.
    Windows names are Unicode already, so there the path is always yielded as is.
    """
    text = os.fspath(path)
    if is_utf8(text) or os.name == "nt":
        yield text
        return
    folder = tempfile.mkdtemp(prefix="aaa-path-")
    try:
        link = os.path.join(folder, "link")
        os.symlink(os.path.abspath(text), link)
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)
