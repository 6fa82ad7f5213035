"""Device and dtype names: only cpu, cuda[:N] and mps (and auto), checked against what this machine has;
and what ``auto`` means on a CPU with and without native bf16."""

from __future__ import annotations

import pytest
import torch

from aaa_core import devices
from aaa_core.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from aaa_core.errors import InputError
from training.cache import encoder_dtype_for
from training.config import TrainConfig


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


@pytest.fixture
def detection(monkeypatch):
    """Unsets the suite-wide AAA_CPU_BF16=0 and returns a switch for what the CPU probe reports."""
    monkeypatch.delenv("AAA_CPU_BF16")
    found = {"bf16": False}
    monkeypatch.setattr(devices, "_detect_cpu_bf16", lambda: found["bf16"])
    return found


@pytest.mark.parametrize("native, dtype, precision", [(True, torch.bfloat16, "bf16"), (False, torch.float32, "fp32")])
def test_cpu_auto_dtype_and_training_precision_follow_native_bf16(detection, native, dtype, precision):
    detection["bf16"] = native
    assert resolve_dtype("auto", torch.device("cpu")) == dtype
    assert TrainConfig(data="x").resolved_precision(use_cuda=False) == precision
    assert TrainConfig(data="x", precision="fp32").resolved_precision(use_cuda=False) == "fp32"  # explicit wins
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert encoder_dtype_for("auto", torch.device("cpu")) == dtype  # the cache follows the same rule
    assert TrainConfig(data="x").resolved_precision(use_cuda=True) == "bf16"  # any CUDA GPU trains in bf16


def test_the_environment_overrides_the_probe_and_bad_values_name_it(detection, monkeypatch):
    detection["bf16"] = False
    monkeypatch.setenv("AAA_CPU_BF16", "1")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("AAA_CPU_BF16", "yes")
    with pytest.raises(InputError, match=r"^AAA_CPU_BF16='yes': use 1 \(the CPU has native bf16\) or 0"):
        cpu_has_native_bf16()


def test_probe_reads_cpuinfo_flags_when_torch_has_no_feature_probe(monkeypatch, tmp_path):
    """Without PyTorch's private probe the Linux flags decide; no /proc/cpuinfo (macOS, Windows): float32."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    for flags, expected in [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_tile amx_bf16", True), ("fpu avx512f avx2", False)]:
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        devices._detect_cpu_bf16.cache_clear()
        assert devices._detect_cpu_bf16() is expected, flags
    cpuinfo.unlink()
    devices._detect_cpu_bf16.cache_clear()
    assert devices._detect_cpu_bf16() is False
    devices._detect_cpu_bf16.cache_clear()
