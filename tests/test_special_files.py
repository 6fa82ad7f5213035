"""A named pipe (FIFO) or a device given where a file is read: one line naming it, never a hang.

Opening a FIFO for reading blocks until someone writes to it, so before the fix each of these
inputs hung the run silently. Every test runs under a short alarm so a regression fails instead
of hanging the suite.
"""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aaa_core.cli import main as cli_main
from aaa_core.errors import InputError
from tiny_models import save_tiny_models
from training.config import parse_config
from training.pairs import find_samples

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")


@pytest.fixture(autouse=True)
def no_hang():
    def hung(*_):
        raise AssertionError("the read blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def generate(models, tmp_path, capsys, **overrides):
    files = {"dit": models["dit"], "vae": models["vae"], "text_encoder": models["text_encoder"], **overrides}
    extra = ["--image", str(files.pop("image"))] if "image" in files else []
    code = cli_main([
        "generate", "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--device", "cpu",
        "--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text-encoder", str(files["text_encoder"]),
        "--output", str(tmp_path / "out.png"), *extra,
    ])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.png").exists() and not list(tmp_path.glob("*aaa-tmp*"))
    return err


@pytest.mark.parametrize("flag", ["dit", "vae", "text_encoder"])
def test_fifo_as_a_model_file(models, tmp_path, capsys, flag):
    pipe = fifo(tmp_path / "model.safetensors")
    err = generate(models, tmp_path, capsys, **{flag: pipe})
    assert f"{pipe}: is a named pipe (FIFO), not a regular file; expected a .safetensors file" in err


def test_character_device_as_a_model_file(models, tmp_path, capsys):
    err = generate(models, tmp_path, capsys, vae=Path("/dev/null"))
    assert "/dev/null: is a character device, not a regular file; expected a .safetensors file" in err


def test_fifo_as_the_input_image(models, tmp_path, capsys):
    pipe = fifo(tmp_path / "in.png")
    err = generate(models, tmp_path, capsys, image=pipe)
    assert f"{pipe}: is a named pipe (FIFO), not a regular file; expected an image file" in err


def test_text_encoder_config_that_is_not_utf8(models, tmp_path, capsys):
    """Not a special file, but the same family of unreadable text: the byte is named, not a codec traceback."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(Path(models["text_encoder"]).read_bytes())
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    err = generate(models, tmp_path, capsys, text_encoder=folder)
    assert f"{folder / 'config.json'}: not UTF-8 text (byte 0xff at 0); expected a JSON file" in err


def test_fifo_as_the_metadata_csv(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a caption", encoding="utf-8")
    pipe = fifo(tmp_path / "metadata.csv")
    with pytest.raises(InputError, match=r"metadata.csv: is a named pipe \(FIFO\), not a regular file; expected a CSV file"):
        find_samples(tmp_path)  # the folder: the CSV found in it is refused, not silently skipped
    with pytest.raises(InputError, match="is a named pipe"):
        find_samples(pipe)  # --data naming the FIFO itself


def test_fifo_folder_and_bad_text_as_the_training_config(tmp_path):
    with pytest.raises(InputError, match=r"run.toml: is a named pipe \(FIFO\), not a regular file; expected a TOML file"):
        parse_config(["--config", str(fifo(tmp_path / "run.toml"))])
    with pytest.raises(InputError, match="is a folder, expected a TOML file"):
        parse_config(["--config", str(tmp_path)])
    (tmp_path / "latin1.toml").write_bytes('data = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at 11\); expected a UTF-8 TOML file"):
        parse_config(["--config", str(tmp_path / "latin1.toml")])
