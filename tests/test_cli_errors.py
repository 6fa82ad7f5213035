"""The CLI's one-line errors for bad values, bad output paths, overflowing numbers and lack of memory.

Each test feeds the bad value through ``aaa_core.cli.main`` and checks the exit code, the one
line on stderr (naming the flag or file and what was expected) and that no file is left behind.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aaa_core.checkpoint import save_safetensors
from aaa_core.cli import main
from aaa_core.dit import CONFIG_METADATA_KEY, AAADiT
from aaa_core.limits import SEED_MAX
from aaa_core.outputs import temp_path_for
from aaa_core.pipeline import AAAPipeline
from tiny_models import TINY_DIT, save_tiny_models

ROOT = Path(__file__).resolve().parents[1]
ABSENT_MODELS = ["--dit", "no-dit", "--vae", "no-vae", "--text-encoder", "no-te"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def model_args(models, dit=None):
    return ["--dit", str(dit or models["dit"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])]


def run(args, capsys):
    """Runs the CLI in-process; returns (exit code, stderr)."""
    code = main(["generate", *args])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 1, err
    lines = [line for line in err.split("\n") if not line.startswith("\r")]  # less the sampling progress bar
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == "", err  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], err


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------
# Values: refused before any model is loaded (the model paths do not even exist)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cfg", "nan"], "--cfg nan: must be a finite number"),
        (["--cfg", "inf"], "--cfg inf: must be a finite number"),
        (["--cfg=-inf"], "--cfg -inf: must be a finite number"),
        (["--image", "in.png", "--denoise", "nan"], "--denoise nan: must be a finite number"),
        (["--denoise", "1.5"], "--denoise 1.5: must be in (0, 1]"),
        (["--width", "8208"], "--width 8208 is above the maximum of 8192"),
        (["--height", "0"], "--height 0 is not a positive multiple of 16; try 16"),
        (["--batch-size", "0"], "--batch-size 0: must be between 1 and 4096"),
        (["--batch-size", "5000"], "--batch-size 5000: must be between 1 and 4096"),
        (["--steps", "10001"], "--steps 10001: must be between 1 and 10000"),
        (["--seed", "-1"], "--seed -1: must be between 0 and 18446744073709551615"),
        (["--seed", str(2**64)], f"--seed {2**64}: must be between 0 and 18446744073709551615"),
        (["--prompt", "caf\udce9"], "--prompt: character 3 is not valid text (byte 0xe9); pass the prompt as UTF-8"),
        (["--negative-prompt", "ugly\0"], "--negative-prompt: character 4 is a NUL character"),
        (["--device", "xpu"], "--device 'xpu': unknown device; use auto, cpu, cuda, cuda:N or mps"),
        (["--device", "meta"], "--device 'meta': unknown device"),
        (["--dtype", "int8"], "--dtype 'int8': unknown dtype; use auto, float32, bfloat16 or float16"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    code, err = run(["--prompt", "x", *ABSENT_MODELS, "--output", "out/x.png", *extra], capsys)
    assert_one_line_error(code, err, message)
    assert files_in(tmp_path) == ["in.png"]  # not even the output folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--width", "abc", "--output", "x.png"], "error: argument --width: invalid int value: 'abc' (see python -m aaa_core generate --help)"),
        (["--output", "x.png"], "error: the following arguments are required: --prompt (see python -m aaa_core generate --help)"),
    ],
)
def test_usage_mistakes_are_one_line_too(capsys, args, message):
    with pytest.raises(SystemExit) as excinfo:
        main(["generate", *args])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_a_cuda_device_that_is_not_there_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = run(["--prompt", "x", *ABSENT_MODELS, "--device", "cuda:2", "--output", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "--device 'cuda:2': there is no such GPU; this machine has 2 (cuda:0 to cuda:1)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run(["--prompt", "x", *ABSENT_MODELS, "--device", "cuda:0", "--output", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "--device 'cuda:0': PyTorch sees no CUDA GPU here; use cpu")
    assert files_in(tmp_path) == []


def test_undecodable_prompt_bytes_from_a_shell_are_one_line(tmp_path):
    """A real argv: the byte 0xe9 (Latin-1 'e acute') is not UTF-8, so Python hands it over as a surrogate."""
    out = tmp_path / "x.png"
    result = subprocess.run(
        [sys.executable, "-m", "aaa_core", "generate", "--prompt", b"caf\xe9", *ABSENT_MODELS, "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUTF8": "1"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --prompt: character 3 is not valid text (byte 0xe9); pass the prompt as UTF-8 (check the terminal's or file's encoding)"
    ]
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Output paths: checked before any model is loaded
# --------------------------------------------------------------------------------------


def test_unwritable_outputs_are_refused_before_loading_models(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "b_1.png").mkdir()  # the second name of a batch
    (tmp_path / "file").write_text("not a folder")
    long_name = "x" * 300 + ".png"
    cases = [
        (["--output", str(tmp_path / "taken.png")], f"{tmp_path / 'taken.png'}: cannot be written: a folder has that name: use a file name"),
        (["--output", str(tmp_path / "b.png"), "--batch-size", "2"], f"{tmp_path / 'b_1.png'}: cannot be written: a folder has that name"),
        (["--output", str(tmp_path / "file" / "x.png")], "cannot be written: a part of the path is a file, not a folder"),
        (["--output", str(tmp_path / long_name)], "cannot be written: the name is too long for this file system: use a shorter one"),
        (["--output", str(tmp_path / ("d" * 300) / "x.png")], "the name is too long for this file system"),
    ]
    for extra, message in cases:
        code, err = run(["--prompt", "x", *ABSENT_MODELS, *extra], capsys)
        assert_one_line_error(code, err, message)
    assert files_in(tmp_path) == ["b_1.png", "file", "taken.png"]


@pytest.mark.parametrize(
    "code,reason",
    [(errno.EACCES, "no permission to write there"), (errno.EROFS, "the file system is read-only: write elsewhere")],
)
def test_a_folder_that_refuses_new_files_is_refused_up_front(tmp_path, capsys, monkeypatch, code, reason):
    """The probe file the check creates fails as it would on a read-only mount or without permission
    (simulated: the tests run as root, which may write anywhere)."""
    from aaa_core import outputs

    def refuse(path, mode="r", *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(outputs, "open", refuse, raising=False)
    exit_code, err = run(["--prompt", "x", *ABSENT_MODELS, "--output", str(tmp_path / "sub" / "x.png")], capsys)
    assert_one_line_error(exit_code, err, f"{tmp_path / 'sub' / 'x.png'}: cannot be written: {reason}")
    assert files_in(tmp_path) == []


def test_a_full_disk_while_writing_a_batch_leaves_no_image_and_keeps_the_old_ones(models, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "b_0.png")
    saved = []
    original_save = Image.Image.save

    def save_then_fill_the_disk(self, fp, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(fp)
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fill_the_disk)
    code, err = run(["--prompt", "x", "--steps", "1", "--width", "16", "--height", "16", "--batch-size", "3",
                     *model_args(models), "--output", str(tmp_path / "b.png")], capsys)
    assert_one_line_error(code, err, f"{tmp_path / 'b_0.png'} (and 2 more): cannot be written: the disk is full")
    assert len(saved) == 1  # the first image was written (to its temp), the second failed
    assert files_in(tmp_path) == ["b_0.png"]  # no new image, no temp
    assert np.array(Image.open(tmp_path / "b_0.png"))[0, 0].tolist() == [1, 2, 3]


def test_a_run_sweeps_the_temps_a_killed_run_left_in_its_output_folder(models, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left_over = temp_path_for(tmp_path / "out.png")
    left_over = left_over.with_name(left_over.name.replace(f".{os.getpid()}-", f".{dead.pid}-"))
    left_over.mkdir()
    (left_over / "out.png").write_bytes(b"half a png")
    code, err = run(["--prompt", "x", "--steps", "1", "--width", "16", "--height", "16",
                     *model_args(models), "--output", str(tmp_path / "out.png")], capsys)
    assert code == 0, err
    assert files_in(tmp_path) == ["out.png"]


# --------------------------------------------------------------------------------------
# Numbers that overflow, and memory
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loud_dit(tmp_path_factory) -> Path:
    """A DiT whose output layer is 1e5 times too strong: finite weights (all within float16's range),
    fine in float32 and bfloat16, but its velocities overflow float16."""
    torch.manual_seed(0)
    model = AAADiT(TINY_DIT)
    with torch.no_grad():
        model.proj_out.weight.mul_(1e5)
    path = tmp_path_factory.mktemp("loud") / "loud.safetensors"
    save_safetensors(model.state_dict(), path, {CONFIG_METADATA_KEY: TINY_DIT.to_json()})
    return path


def test_float16_overflow_is_refused_before_decoding_with_its_cause(models, loud_dit, tmp_path, capsys):
    base = ["--prompt", "x", "--steps", "2", "--cfg", "1", "--width", "16", "--height", "16", "--output", str(tmp_path / "x.png")]
    code, err = run([*base, *model_args(models, loud_dit), "--dtype", "float16"], capsys)
    assert_one_line_error(code, err, "error: sampled latents hold 128 NaN/inf values out of 128: float16 overflow: use bfloat16 or float32")
    assert files_in(tmp_path) == []
    code, err = run([*base, *model_args(models, loud_dit), "--dtype", "bfloat16"], capsys)
    assert code == 0, err  # the advice works


def test_a_huge_cfg_is_named_as_the_cause(models, tmp_path, capsys):
    code, err = run(["--prompt", "x", "--steps", "2", "--cfg", "1e38", "--width", "16", "--height", "16",
                     *model_args(models), "--output", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "NaN/inf values", "cfg 1e+38 is too large: use a value between 1 and 15")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"),
        MemoryError(),
    ],
)
def test_out_of_memory_says_what_to_reduce(models, tmp_path, capsys, monkeypatch, error):
    def run_out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(AAAPipeline, "generate", run_out_of_memory)
    code, err = run(["--prompt", "x", "--width", "64", "--height", "32", "--batch-size", "2", *model_args(models),
                     "--device", "cpu", "--dtype", "float32", "--output", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(
        code, err,
        "error: out of memory while generating 2 image(s) of 64x32 on cpu in torch.float32: reduce --batch-size, "
        "reduce --width/--height, use --dtype bfloat16, or use another --device",
    )
    assert files_in(tmp_path) == []


def test_other_runtime_errors_are_not_mistaken_for_memory(models, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(AAAPipeline, "generate", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--prompt", "x", *model_args(models), "--output", str(tmp_path / "x.png")])


def test_the_last_seed_wraps_to_zero_as_in_the_node(models, tmp_path, capsys):
    base = ["--prompt", "x", "--steps", "2", "--width", "16", "--height", "16", *model_args(models)]
    code, err = run([*base, "--seed", str(SEED_MAX), "--batch-size", "2", "--output", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    code, err = run([*base, "--seed", "0", "--output", str(tmp_path / "zero.png")], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "b_1.png") as last, Image.open(tmp_path / "zero.png") as zero:
        diff = np.abs(np.array(last, dtype=int) - np.array(zero, dtype=int))
        assert diff.max() <= 1  # image 1 of the batch is seed 0 (up to batched-matmul rounding)
        assert "seed: 0," in last.text["parameters"]  # and its PNG says so


# --------------------------------------------------------------------------------------
# Missing model files: the library's message plus the CLI's own way out
# --------------------------------------------------------------------------------------

def test_offline_missing_files_end_with_the_flags_that_pass_them(models, tmp_path, monkeypatch, capsys):
    import importlib

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    # importlib: the modelscope.hub package re-exports a function of the same name as the module.
    monkeypatch.setattr(importlib.import_module("modelscope.hub.snapshot_download"), "snapshot_download", offline)
    args = ["--prompt", "x", "--vae", str(models["vae"]), "--model-dir", str(tmp_path / "models"), "--output", str(tmp_path / "o.png")]
    code, err = run(args, capsys)
    assert_one_line_error(code, err, "2 model files are missing or bad: (1) Qwen3-0.6B text encoder not found at",
                          "(2) AAADiT not found at")
    assert err.rstrip().endswith("; or pass a local file with --text-encoder / --dit"), err
    assert "explicitly" not in err
