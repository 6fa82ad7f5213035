"""Reading a Qwen3 ``config.json`` with every value checked, and building the empty model it describes.

transformers accepts some bad values (a string ``rope_theta``, 0 heads) and fails later inside
model construction with a ``ZeroDivisionError``, a ``KeyError`` or a multi-line validation report;
here each becomes one line naming the file and the key, before any weight is read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3Model
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .config_values import json_object, positive_int, positive_number
from .errors import ModelFileError, short_reason
from .input_files import not_utf8_message

# config.json sizes that must be positive integers; head_dim may be null (hidden_size / heads then).
_SIZE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim",
)


def read_json_file(file: Path) -> dict:
    """The JSON object in ``file``, or a one-line error naming it."""
    try:
        return json_object(file.read_text(encoding="utf-8"), "the file")
    except OSError as err:
        raise ModelFileError(f"{file}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ModelFileError(not_utf8_message(file, err, "a JSON file")) from None
    except ValueError as err:
        raise ModelFileError(f"{file}: {short_reason(err)}") from None


def _check_config_values(data: dict) -> None:
    """Raises ``ValueError`` naming the first size, number, activation or rope setting of the wrong type or range."""
    for key in _SIZE_KEYS:
        if key in data and not (key == "head_dim" and data[key] is None):
            positive_int(key, data[key])
    for key in ("rms_norm_eps", "rope_theta"):
        if key in data:
            positive_number(key, data[key])
    if data.get("hidden_act", "silu") not in ACT2FN:
        raise ValueError(f"hidden_act {data['hidden_act']!r} is not an activation transformers knows")
    heads, kv_heads = data.get("num_attention_heads"), data.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = data.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{key} must be an object or null, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        known = ("default", *ROPE_INIT_FUNCTIONS)
        if rope_type not in known:
            raise ValueError(f"{key} has an unknown rope type {rope_type!r} (known: {', '.join(known)})")


def read_config(file: Path) -> Qwen3Config:
    """The validated Qwen3 config in ``file``; every problem is one line naming the file and the key."""
    data = read_json_file(file)
    try:
        _check_config_values(data)
        config = Qwen3Config.from_dict(data, attn_implementation="sdpa")
        build_empty_model(config)  # on the meta device: runs every check model construction makes, in ~0.1 s
    except Exception as err:  # transformers and its strict dataclasses raise many types; the user needs one line
        raise ModelFileError(f"{file}: not a valid Qwen3 config.json ({short_reason(err)})") from None
    return config


def build_empty_model(config: Qwen3Config) -> Qwen3Model:
    """A ``Qwen3Model`` on the meta device (no memory, no init), with SDPA attention."""
    config = copy.deepcopy(config)  # never mutate the caller's config
    config._attn_implementation = "sdpa"  # fast on CPU, CUDA and MPS; the reference's default too
    with torch.device("meta"):
        return Qwen3Model(config)
