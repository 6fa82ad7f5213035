"""Atomic writes: short temp names, all-or-nothing batches, clean-up that never hides the error,
sweeping the temps of killed runs, and one-line OS errors (including safetensors' own)."""

import errno
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

from aaa_core import checkpoint
from aaa_core.checkpoint import save_safetensors
from aaa_core.outputs import atomic_output, is_temp_file, sweep_temp_files, temp_path_for
from aaa_core.errors import OutputError
from aaa_core.outputs import atomic_outputs, check_writable


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def temp_of(target, pid: int):
    """A temp name for ``target`` as process ``pid`` would have made it."""
    temp = temp_path_for(target)
    return temp.with_name(temp.name.replace(f".{os.getpid()}-", f".{pid}-"))


def test_temp_names_stay_short_so_a_name_at_the_limit_still_works(tmp_path):
    name = "n" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".png"
    temp = temp_path_for(tmp_path / name)
    assert len(temp.name) < 80 and is_temp_file(temp)
    with atomic_output(tmp_path / name) as tmp:
        tmp.write_bytes(b"png")
    assert (tmp_path / name).read_bytes() == b"png"
    assert os.listdir(tmp_path) == [name]


def test_is_temp_file_knows_only_its_own_pattern(tmp_path):
    assert is_temp_file(".out.png.1234-0123abcd.aaa-tmp") and is_temp_file(".step-000010.aaa-tmp")
    assert temp_path_for(tmp_path / "step-000010", shared=True) == tmp_path / ".step-000010.aaa-tmp"
    for name in ("out.png", ".out.png.tmp", ".step-000010.tmp", ".notes.tmp", "out.aaa-tmp", ".out.png.1234-0123abcd.tmp"):
        assert not is_temp_file(name), name  # a user's own hidden .tmp files are never swept


def test_a_batch_is_renamed_only_when_every_file_was_written(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old a")
    with pytest.raises(RuntimeError, match="encoder crashed"), atomic_outputs([tmp_path / "a.png", tmp_path / "b.png"]) as temps:
        temps[0].write_bytes(b"new a")
        raise RuntimeError("encoder crashed")
    assert os.listdir(tmp_path) == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"old a"
    with atomic_outputs([tmp_path / "a.png", tmp_path / "sub" / "b.png"]) as temps:
        for temp, data in zip(temps, (b"new a", b"new b")):
            temp.write_bytes(data)
    assert (tmp_path / "a.png").read_bytes() == b"new a" and (tmp_path / "sub" / "b.png").read_bytes() == b"new b"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "sub"]


def test_a_failing_clean_up_never_hides_the_real_error(tmp_path, monkeypatch, caplog):
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="the real error"):
        with atomic_output(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the real error")
    assert "could not remove the temp" in caplog.text and "delete it by hand" in caplog.text


def test_os_errors_while_writing_name_the_target_in_one_line(tmp_path):
    with pytest.raises(OutputError) as excinfo, atomic_output(tmp_path / "x.bin") as tmp:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert str(excinfo.value) == f"{tmp_path / 'x.bin'}: cannot be written: the disk is full: free some space or write elsewhere"
    with pytest.raises(OutputError, match="x.bin: cannot be written: a folder has that name"):
        (tmp_path / "x.bin").mkdir()
        with atomic_output(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"data")
    assert os.listdir(tmp_path) == ["x.bin"]


def test_safetensors_io_errors_become_the_same_one_line_error(tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path \"{filename}.tmp1\"")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OutputError) as excinfo:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    assert str(excinfo.value) == f"{tmp_path / 'model.safetensors'}: cannot be written: the disk is full: free some space or write elsewhere"
    assert os.listdir(tmp_path) == []


def test_sweep_removes_only_the_stale_temps_of_dead_processes(tmp_path):
    stale_folder = temp_of(tmp_path / "model.safetensors", dead_pid())
    stale_folder.mkdir()
    (stale_folder / ".tmpQkDAyC").write_bytes(b"safetensors' own temp")
    stale_file = temp_of(tmp_path / "out.png", dead_pid())
    stale_file.write_bytes(b"half")
    shared = temp_path_for(tmp_path / "step-000003", shared=True)  # names no process: always stale
    shared.mkdir()
    live = temp_of(tmp_path / "live.png", os.getppid())  # our parent is alive
    live.write_bytes(b"being written")
    (tmp_path / ".keep.tmp").write_bytes(b"not ours")
    assert sweep_temp_files(tmp_path) == sorted([stale_folder, stale_file, shared])
    assert sorted(os.listdir(tmp_path)) == sorted([".keep.tmp", live.name])
    assert sweep_temp_files(tmp_path / "missing") == []


def test_an_earlier_process_with_our_pid_is_swept(tmp_path):
    """Containers hand out the same pid on every start: a temp with our pid that is not in flight is stale."""
    leftover = temp_path_for(tmp_path / "out.png")
    leftover.write_bytes(b"half")
    assert sweep_temp_files(tmp_path) == [leftover]


def test_check_writable_creates_nothing(tmp_path):
    check_writable([tmp_path / "a" / "b" / "x.png", tmp_path / "y.png"])
    assert os.listdir(tmp_path) == []
    with pytest.raises(OutputError, match="cannot be written: a folder has that name"):
        check_writable([tmp_path])


def test_an_os_error_without_advice_keeps_its_own_text(tmp_path):
    with pytest.raises(OutputError) as excinfo, atomic_output(tmp_path / "x.png"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert str(excinfo.value) == f"{tmp_path / 'x.png'}: cannot be written: {os.strerror(errno.EIO)}"
