"""No command writes over one of its own inputs: export's state files and base, the CLI's --image and
model files, the trainer's data and --init-from (issue 16, item 1). Each refusal is one line and
leaves the input's bytes as they were; the same command with another output still works.
"""

import json
import os

import pytest
import torch
from PIL import Image

from aaa_core.checkpoint import save_safetensors
from aaa_core.cli import main as cli_main
from aaa_core.dit import AAADiT
from aaa_core.errors import InputError, OutputError
from aaa_core.lora import kohya_stem
from aaa_core.outputs import check_not_an_input
from tiny_models import TINY_DIT, save_tiny_dit, save_tiny_models
from training.checkpoints import PROGRESS_FILE, STATE_FORMAT
from training.config import parse_config
from training.export import main as export_main

RANK = 2


@pytest.fixture
def state(tmp_path):
    """A training state folder as save_state writes it, with the files export reads."""
    folder = tmp_path / "run" / "states" / "step-000002"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    weights = AAADiT(TINY_DIT).state_dict()
    save_safetensors(weights, folder / "model.safetensors")
    save_safetensors(weights, folder / "ema.safetensors")
    progress = {"state_format": STATE_FORMAT, "run_id": "r1", "step": 2, "model_config": TINY_DIT.to_json()}
    (folder / PROGRESS_FILE).write_text(json.dumps(progress), encoding="utf-8")
    return folder


@pytest.fixture
def lora(tmp_path):
    """A base checkpoint and a one-layer kohya LoRA for it."""
    base = save_tiny_dit(tmp_path / "base.safetensors")
    stem = kohya_stem("blocks.0.to_q")
    torch.manual_seed(1)
    adapters = {f"{stem}.lora_down.weight": torch.randn(RANK, TINY_DIT.dim),
                f"{stem}.lora_up.weight": torch.randn(TINY_DIT.dim, RANK), f"{stem}.alpha": torch.tensor(1.0)}
    save_safetensors(adapters, tmp_path / "lora.safetensors")
    return base, tmp_path / "lora.safetensors"


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error(caplog):
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return message


def test_export_refuses_to_write_over_the_states_own_weights(state, tmp_path, caplog):
    before = snapshot(state)
    assert export_main([str(state), str(state / "model.safetensors"), "--weights", "raw"]) == 1
    message = one_error(caplog)
    assert "model.safetensors of the state" in message and "an input of this command" in message and "\n" not in message
    assert snapshot(state) == before  # the fp32 weights a --resume continues from are untouched
    assert export_main([str(state), str(tmp_path / "raw.safetensors"), "--weights", "raw"]) == 0


@pytest.mark.parametrize("how", ["dotted", "symlink", "hard link"])
def test_export_sees_through_other_names_of_a_state_file(state, tmp_path, caplog, how):
    target = state / "ema.safetensors"
    if how == "dotted":
        output = state / ".." / state.name / "ema.safetensors"
    else:
        output = tmp_path / "other-name.safetensors"
        (os.symlink if how == "symlink" else os.link)(target, output)
    before = target.read_bytes()
    assert export_main([str(state), str(output)]) == 1
    assert "ema.safetensors of the state" in one_error(caplog)
    assert target.read_bytes() == before


def test_export_refuses_to_write_a_merged_lora_over_its_base(lora, tmp_path, caplog):
    base, lora_file = lora
    before = base.read_bytes()
    assert export_main([str(lora_file), str(base), "--base", str(base)]) == 1
    assert "the --base checkpoint" in one_error(caplog)
    assert base.read_bytes() == before
    caplog.clear()
    assert export_main([str(lora_file), str(lora_file), "--base", str(base)]) == 1
    assert "the LoRA file" in one_error(caplog)
    assert export_main([str(lora_file), str(tmp_path / "merged.safetensors"), "--base", str(base)]) == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def test_the_cli_refuses_to_write_an_image_over_its_input_image(models, tmp_path, capsys):
    picture = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(picture)
    before = picture.read_bytes()
    args = ["generate", "--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "1", "--image", str(picture),
            "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])]
    assert cli_main([*args, "--output", str(tmp_path / "." / "photo.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "it is the --image" in err
    assert picture.read_bytes() == before


def test_a_batch_output_named_like_a_model_file_is_refused(tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "vocab_0.png").write_bytes(b"not really a picture")
    with pytest.raises(OutputError, match=r"it is vocab_0.png of the --text-encoder"):
        check_not_an_input([tmp_path / "out.png", encoder / "vocab_0.png"], {"the --text-encoder": encoder, "the --dit file": None})
    check_not_an_input([tmp_path / "vocab_0.png"], {"the --text-encoder": encoder})  # same name, another file: fine


def test_the_trainer_refuses_an_output_folder_inside_its_data(tmp_path):
    data = tmp_path / "pictures"
    data.mkdir()
    with pytest.raises(InputError, match="lies in the training data folder"):
        parse_config(["--data", str(data), "--output-dir", str(data / "run"), "--max-steps", "1"])
    with pytest.raises(InputError, match="lies in the training data folder"):  # a CSV's folder holds its images
        parse_config(["--data", str(data / "metadata.csv"), "--output-dir", str(data), "--max-steps", "1"])
    parse_config(["--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])


def test_the_trainer_refuses_to_fine_tune_a_file_it_would_replace(tmp_path):
    out = tmp_path / "run"
    inside = out / "checkpoints" / "run-step-000010.safetensors"
    with pytest.raises(InputError, match="which this run writes and prunes"):
        parse_config(["--data", str(tmp_path / "pictures"), "--output-dir", str(out), "--init-from", str(inside), "--max-steps", "1"])
