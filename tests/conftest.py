"""Fixtures: float32 as the CPU's ``auto`` dtype in every test; for the node tests (which run in the
ComfyUI imported by ``pack_import``), tiny model files in ComfyUI's folder layout and the three
models loaded once through the loader nodes. Node test modules opt in with
``pytestmark = pytest.mark.usefixtures("model_folders")``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from comfyui_inprocess import boot
from tiny_models import save_tiny_models

# When the checkout's folder name is a Python identifier, pytest imports the repository's
# __init__.py as the test folder's package before any test runs; it imports the nodes, which
# import ComfyUI. So ComfyUI's libraries go on the path here, before anything is collected.
boot()


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """Runs every test as on a CPU without native bf16, so ``auto`` means float32 on any machine
    (this one and CI's have AVX512-BF16); the bf16 tests set ``AAA_CPU_BF16=1`` themselves.
    Session-scoped so it holds for module-level fixtures and subprocesses too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AAA_CPU_BF16", "0")
        yield


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_models(root)
    return root


@pytest.fixture
def model_folders(models_root, monkeypatch):
    """Points ComfyUI's model folders at the tiny models, and leaves no progress hook or Cancel behind."""
    import comfy.model_management
    import comfy.utils
    from node_helpers import model_dirs, use_model_dirs

    use_model_dirs(monkeypatch, model_dirs(models_root))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    yield
    comfy.model_management.interrupt_current_processing(False)


@pytest.fixture(scope="module")
def models(models_root):
    from node_helpers import model_dirs, use_model_dirs
    from pack_import import node

    with pytest.MonkeyPatch.context() as patch:
        use_model_dirs(patch, model_dirs(models_root))
        (dit,) = node("AAADiTLoader")("aaa_tiny.safetensors", "auto")
        (text_encoder,) = node("AAATextEncoderLoader")("qwen3_tiny.safetensors", "auto")
        (vae,) = node("AAAVAELoader")("flux2_tiny.safetensors", "auto")
    return SimpleNamespace(dit=dit, text_encoder=text_encoder, vae=vae, dit_path=models_root / "unet" / "aaa_tiny.safetensors")


@pytest.fixture(scope="module")
def prompts(models):
    from pack_import import node

    (positive,) = node("AAATextEncode")(models.text_encoder, "a green lizard pokemon with a plant bulb on its back")
    (negative,) = node("AAATextEncode")(models.text_encoder, " ")
    return positive, negative
