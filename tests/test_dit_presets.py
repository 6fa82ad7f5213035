"""The --model presets: their sizes, the trainer's precedence rules, and that every preset's
checkpoint, written as the trainer writes it, loads strictly in aaa_core and in the DiT loader node.

The small presets are saved and loaded for real. The large ones (0.46B and 1B parameters) would
cost seconds and gigabytes, so their files are sparse: the header the trainer would write, with an
unwritten (all-zero) data region, checked key by key and shape by shape from the header alone.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from aaa_core.dit import DEFAULT_PRESET, DIT_PRESETS, AAADiT, AAADiTConfig, check_dit_file, empty_dit, load_dit
from aaa_core.checkpoint import check_state_dict_matches, read_header
from aaa_core.errors import InputError
from node_helpers import bridge, use_model_dirs
from pack_import import node, pack_module
from training.checkpoints import save_weights, weights_metadata
from training.config import parse_config

pytestmark = pytest.mark.usefixtures("model_folders")

PARAMETERS = {"AAA-S": 26_391_168, "AAA-B": 128_824_448, "AAA-L": 458_356_352, "AAA-XL": 1_014_925_440}
LOADED_FOR_REAL = ("AAA-S", "AAA-B")


def meta_state_dict(config: AAADiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AAADiT(config).state_dict()


def test_presets_have_the_stated_sizes_and_the_default_is_the_published_model():
    assert list(DIT_PRESETS) == list(PARAMETERS) and DEFAULT_PRESET == "AAA-B"
    assert DIT_PRESETS[DEFAULT_PRESET] == AAADiTConfig()
    for name, config in DIT_PRESETS.items():
        assert sum(t.numel() for t in meta_state_dict(config).values()) == PARAMETERS[name], name
        assert config.dim // config.num_heads in (32, 64), name


def test_trainer_model_flag_picks_a_preset_and_explicit_sizes_win(tmp_path):
    base = ["--data", "x"]
    assert (lambda c: (c.model, c.dim, c.depth, c.num_heads))(parse_config(base)) == ("AAA-B", 1024, 10, 32)
    large = parse_config([*base, "--model", "AAA-L"])
    assert (large.dim, large.depth, large.num_heads) == (1536, 16, 24)
    mixed = parse_config([*base, "--model", "AAA-L", "--depth", "4", "--num-heads", "12"])
    assert (mixed.dim, mixed.depth, mixed.num_heads) == (1536, 4, 12)
    toml = tmp_path / "run.toml"
    toml.write_text('model = "AAA-S"\ndim = 256\n')
    from_file = parse_config(["--config", str(toml), *base])
    assert (from_file.dim, from_file.depth, from_file.num_heads) == (256, 8, 16)
    # The resolved sizes are recorded, so re-running config.toml builds the same model.
    toml.write_text(mixed.to_toml())
    again = parse_config(["--config", str(toml)])
    assert (again.model, again.dim, again.depth, again.num_heads) == ("AAA-L", 1536, 4, 12)


@pytest.mark.parametrize("values, message", [
    ('model = "AAA-M"', "model 'AAA-M': unknown size; use one of AAA-S, AAA-B, AAA-L, AAA-XL"),
    ('model = "AAA-S"\ndim = 500', "dim 500 is not divisible by num_heads 16 (--model AAA-S gives the sizes not set explicitly)"),
    ("depth = -2", "dim 0, depth -2, num_heads 0: sizes must not be negative"),
])
def test_bad_model_sizes_are_one_line_errors(tmp_path, values, message):
    toml = tmp_path / "run.toml"
    toml.write_text(values + '\ndata = "x"\n')
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        parse_config(["--config", str(toml)])


def save_sparse_checkpoint(path, config: AAADiTConfig) -> None:
    """The file ``save_weights`` would write for ``config`` in bf16, with its data region left unwritten."""
    header, offset = {"__metadata__": {"format": "pt", **weights_metadata(config, 1, "ema")}}, 0
    for key, tensor in meta_state_dict(config).items():
        size = tensor.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.truncate(8 + len(encoded) + offset)  # a hole: no disk space, reads as zeros


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_every_presets_checkpoint_loads_strictly_in_core_and_in_the_node(name, tmp_path, monkeypatch):
    config = DIT_PRESETS[name]
    path = tmp_path / f"{name}.safetensors"
    use_model_dirs(monkeypatch, {"unet": [tmp_path]})
    if name in LOADED_FOR_REAL:
        zeros = {k: torch.zeros(t.shape, dtype=torch.bfloat16) for k, t in meta_state_dict(config).items()}
        save_weights(zeros, path, config, step=1, weights="ema", dtype=torch.bfloat16)
        assert load_dit(path).config == config
        (dit,) = node("AAADiTLoader")(path.name, "bf16")
        assert dit.model.diffusion_model.config.to_json() == config.to_json() and dit.model.diffusion_model.dtype == torch.bfloat16
        return
    save_sparse_checkpoint(path, config)
    assert check_dit_file(path) == config  # every key and shape against the model aaa_core would build
    # The node builds ComfyUI's subclass with the bridge's layers; the same file fits it key for key.
    header, metadata = read_header(path)
    comfy_model = empty_dit(header, metadata, path, bridge.dit_operations(), pack_module("nodes.native_dit").ComfyAAADiT)
    check_state_dict_matches(comfy_model, header, path)
    assert comfy_model.config.to_json() == config.to_json()


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_preset_head_count_is_found_without_metadata(name):
    """A preset's file stripped of our metadata still gets the right heads (L and XL use head_dim 64)."""
    assert AAADiTConfig.from_state_dict(meta_state_dict(DIT_PRESETS[name])) == DIT_PRESETS[name]
