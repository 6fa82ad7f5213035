"""Running a snippet of Python as an unprivileged user, for permission tests.

Root may read and write every file, so chmod alone proves nothing when the tests run as root (as
in CI). There the snippet runs as ``nobody`` through util-linux's ``setpriv``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = "65534"  # uid and gid of nobody / nogroup on Linux


def run_unprivileged(code: str) -> str:
    """Runs ``code`` with ``python -c`` from the repository root as a non-root user; returns its stdout."""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        command = [*_drop_privileges(), *command]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.lru_cache(maxsize=1)
def _nobody_prefix() -> "tuple[str, ...] | str":
    """The command prefix that runs as ``nobody``, or why that cannot work here.

    ``nobody`` must be able to start this Python and import the pack and torch from the checkout;
    a checkout or virtual environment under a folder only root may enter (``/root``) rules it out.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "running as root without setpriv: cannot drop privileges"
    prefix = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import aaa_core, torch"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"user nobody cannot run this checkout's Python from {ROOT} ({last_line})"
    return prefix


def _drop_privileges() -> "tuple[str, ...]":
    prefix = _nobody_prefix()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    return prefix


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A fresh folder under the system temp dir that other users may enter (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="aaa-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in folder.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)
