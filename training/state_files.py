"""Nested training state (optimizer, LR scheduler, RNG) stored without pickle.

A state tree of dicts, lists, tuples, numbers, strings, ``None`` and tensors is written as one
safetensors file: the tensors as its tensors, the rest as JSON in its metadata, where each tensor
appears as ``{"__tensor__": name}``. Reading such a file can only ever produce data; a file that
is anything else (a pickle, a truncated write, a foreign safetensors file) is a one-line
:class:`InputError` that names it. Tuples come back as lists, and dicts with non-string keys
(the optimizer's parameter ids) keep their keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from aaa_core.checkpoint import safe_open_any, save_safetensors
from aaa_core.errors import InputError

TREE_KEY = "aaa_state_tree"  # the JSON skeleton in the file's metadata
TENSOR = "__tensor__"
ITEMS = "__items__"  # a dict whose keys are not all strings, as [key, value] pairs

DAMAGED = "resume from another state in OUTPUT_DIR/states (--resume OUTPUT_DIR/states/step-N)"


def save_tree(tree: Any, path: Path) -> None:
    """Writes ``tree`` atomically as a safetensors file (tensors) with its structure as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[name] = value
            return {TENSOR: name}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: encode(v, f"{name}.{k}") for k, v in value.items()}
            return {ITEMS: [[k, encode(v, f"{name}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{name}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{name}: {type(value).__name__} cannot be stored in a training state")

    skeleton = encode(tree, "root")
    save_safetensors(tensors, path, {TREE_KEY: json.dumps(skeleton)})


def load_tree(path: Path, device: "str | torch.device" = "cpu") -> Any:
    """Reads a file written by :func:`save_tree`; every kind of damage is a one-line InputError naming it."""
    tensors, metadata = read_state_tensors(path, device)
    if TREE_KEY not in metadata:
        raise InputError(f"{path}: not a training-state file (no {TREE_KEY} metadata); {DAMAGED}")
    try:
        skeleton = json.loads(metadata[TREE_KEY])
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: damaged training-state file ({err}); {DAMAGED}") from None

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {TENSOR}:
                return tensors[value[TENSOR]]
            if set(value) == {ITEMS}:
                return {k: decode(v) for k, v in value[ITEMS]}
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        return decode(skeleton)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: damaged training-state file (bad entry {err}); {DAMAGED}") from None


def read_state_tensors(path: Path, device: "str | torch.device" = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a state's safetensors file, or a one-line InputError naming it."""
    if not path.is_file():
        raise InputError(f"{path}: missing, the training state is incomplete; {DAMAGED}")
    try:
        with safe_open_any(path, device) as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as err:
        raise InputError(f"{path}: not a readable safetensors file ({err}); {DAMAGED}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})") from None
