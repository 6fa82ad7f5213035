"""Paths whose names are not UTF-8 (any bytes Linux accepts) work everywhere a path goes: model files,
images, outputs, the encoding cache and its pack, metadata and ``config.toml`` (issue 16, item 7).

Python hands such names over as lone surrogates (``os.fsdecode(b"\\xff")`` is ``"\\udcff"``), which
UTF-8 text and Rust libraries (safetensors, tokenizers) refuse; before, that was a UnicodeEncodeError
traceback, or a good model file blamed as "not a readable safetensors file" for its folder's name.
"""

import os
import shutil
import sys

import pytest
import torch
from PIL import Image

from aaa_core.checkpoint import read_safetensors, save_safetensors
from aaa_core.cli import main as cli_main
from aaa_core.dit import load_dit
from aaa_core.path_text import path_text, utf8_alias
from aaa_core.text_encoder import ASSETS_DIR, load_tokenizer
from test_training import TINY, write_dataset
from tiny_models import save_tiny_models
from training.config import parse_config, read_toml
from training.export import main as export_main
from training.train import main as train_main

pytestmark = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="these file systems take only Unicode names")


def odd(name: bytes) -> str:
    """A file name holding bytes that are not UTF-8, as Python gives it."""
    return os.fsdecode(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models") / odd(b"m\xffodels"))


def test_path_text_shows_the_bytes_and_the_alias_reaches_the_file(tmp_path):
    path = tmp_path / odd(b"f\xfe\xff.txt")
    assert path_text(path) == f"{tmp_path}/f\\xfe\\xff.txt" and path_text("caf\u00e9") == "caf\u00e9"
    path.write_bytes(b"payload")
    with utf8_alias(path) as name:
        name.encode("utf-8")
        assert open(name, "rb").read() == b"payload"
    assert not os.path.lexists(name)  # the link is gone, the file stays
    with utf8_alias(tmp_path) as same:
        assert same == str(tmp_path)  # a UTF-8 path is used as it is


def test_safetensors_files_in_such_folders_are_read_and_written(tmp_path):
    path = tmp_path / odd(b"d\xffir") / odd(b"w\xfe.safetensors")
    save_safetensors({"w": torch.arange(6.0)}, path, {"source": str(path)})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0))
    assert metadata["source"] == f"{tmp_path}/d\\xffir/w\\xfe.safetensors"  # the bytes, as escapes
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temp or link left


def test_a_tokenizer_folder_with_such_a_name_loads(tmp_path):
    folder = shutil.copytree(ASSETS_DIR, tmp_path / odd(b"qwen\xff"))
    assert load_tokenizer(folder)("a red creature")["input_ids"] == load_tokenizer(ASSETS_DIR)("a red creature")["input_ids"]


def test_the_cli_reads_and_writes_such_paths(models, tmp_path, caplog):
    picture = tmp_path / odd(b"p\xffics") / odd(b"ph\xfeoto.png")
    picture.parent.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture)
    output = tmp_path / odd(b"o\xffut") / odd(b"r\xfes.png")
    code = cli_main(["generate", "--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "1", "--image", str(picture),
                     "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"]),
                     "--output", str(output)])
    assert code == 0, caplog.text
    written = Image.open(output)
    assert written.size == (32, 32) and "image: 'ph\\\\xfeoto.png'" in written.text["parameters"]


def test_training_export_and_config_toml_with_such_paths(models, tmp_path, caplog):
    data = write_dataset(tmp_path / odd(b"d\xffata"))
    out = tmp_path / odd(b"r\xfeun")
    args = ["--data", str(data), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"]), *TINY,
            "--batch-size", "4", "--max-steps", "2", "--no-tensorboard", "--sample-every", "0", "--data-loading", "shards"]
    assert train_main([*args, "--output-dir", str(out)]) == 0, caplog.text
    checkpoint = out / "checkpoints" / f"{out.name}-step-000002.safetensors"
    assert load_dit(checkpoint).config.dim == 64
    assert list((out / "cache" / "packed").glob("*/index.json"))  # the pack, in a cache under the odd name

    # config.toml: valid TOML, each odd path as a comment that says to pass it again, the rest re-runnable.
    toml = (out / "config.toml").read_text(encoding="utf-8")
    assert f'# data = "{tmp_path}/d\\\\xffata"  # not UTF-8, which TOML cannot hold: pass --data again' in toml
    recorded = read_toml(out / "config.toml")
    assert not {"data", "output_dir", "vae", "text_encoder"} & set(recorded) and recorded["max_steps"] == 2
    again = parse_config(["--config", str(out / "config.toml"), "--data", str(data), "--output-dir", str(out)])
    assert (again.data, again.resolution, again.data_loading) == (str(data), 32, "shards")

    state = out / "states" / "step-000002"
    raw = tmp_path / odd(b"e\xffxport") / odd(b"raw\xfe.safetensors")
    assert export_main([str(state), str(raw), "--weights", "raw"]) == 0, caplog.text
    assert load_dit(raw).config.dim == 64 and read_safetensors(raw)[1]["aaa_weights"] == "raw"
