"""Device and dtype names: only cpu, cuda[:N] and mps (and auto), checked against what this machine has."""

from __future__ import annotations

import pytest
import torch

from aaa_core.devices import resolve_device, resolve_dtype
from aaa_core.errors import InputError


@pytest.mark.parametrize("name, expected", [("cpu", "cpu"), ("cpu:3", "cpu"), (" CPU ", "cpu"), ("Auto", "cpu")])
def test_cpu_names_resolve_to_the_one_cpu_device(name, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(name) == torch.device(expected)


def test_gpu_names_are_checked_against_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("mps:0") == torch.device("mps")
    for name, message in [
        ("cuda:1", "device 'cuda:1': there is no such GPU; this machine has 1 (cuda:0 to cuda:0)"),
        ("mps:1", "device 'mps:1': there is only one MPS device; use mps"),
        ("cuda:x", "device 'cuda:x': unknown device"),
        ("vulkan", "device 'vulkan': unknown device"),
    ]:
        with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            resolve_device(name)


def test_dtype_names_are_case_insensitive_and_unknown_ones_name_the_option():
    assert resolve_dtype("BF16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(InputError, match="^--dtype 'float64': unknown dtype; use auto, float32, bfloat16 or float16$"):
        resolve_dtype("float64", torch.device("cpu"), "--dtype")
