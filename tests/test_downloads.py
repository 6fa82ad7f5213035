"""Downloads are verified before they take their final name; bad, missing and unwritable targets are one line.

ModelScope is replaced by a stand-in that writes into the staging folder the way
``snapshot_download`` does, so every case is a real file on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from pathlib import Path

import pytest

from aaa_core import downloads
from aaa_core.errors import ModelFileError
from tiny_models import save_tiny_dit, save_tiny_vae
from unprivileged import run_unprivileged, shared_folder


@pytest.fixture
def vae_bytes(tmp_path_factory) -> bytes:
    return save_tiny_vae(tmp_path_factory.mktemp("src") / "vae.safetensors").read_bytes()


def fake_modelscope(monkeypatch, payload=None, error=None) -> list:
    """Makes ``snapshot_download`` write ``payload`` (no client error) or raise ``error``; returns its calls."""
    calls = []

    def snapshot_download(repo_id, allow_patterns, local_dir, progress_callbacks=()):
        calls.append(repo_id)
        if error is not None:
            raise error
        path = Path(local_dir) / allow_patterns[0]
        path.parent.mkdir(parents=True, exist_ok=True)  # local_dir may exist, as with ModelScope itself
        path.write_bytes(payload)

    # importlib: the modelscope.hub package re-exports a function of the same name as the module.
    monkeypatch.setattr(importlib.import_module("modelscope.hub.snapshot_download"), "snapshot_download", snapshot_download)
    return calls


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def test_download_cut_short_without_an_error_is_discarded(tmp_path, monkeypatch, vae_bytes):
    fake_modelscope(monkeypatch, vae_bytes[: len(vae_bytes) - 1000])
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path)
    message = one_line(err)
    assert message.startswith("FLUX.2 VAE: the file downloaded from ModelScope failed its check and was discarded (")
    assert "not a readable safetensors file" in message
    assert f"nothing was saved at {tmp_path / 'flux2_vae.safetensors'}. Run again to retry" in message
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the staging folder


def test_download_of_another_model_is_discarded(tmp_path, monkeypatch):
    dit_bytes = save_tiny_dit(tmp_path / "dit.safetensors").read_bytes()
    (tmp_path / "dit.safetensors").unlink()
    fake_modelscope(monkeypatch, dit_bytes)
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path)
    assert "(holds an AAADiT diffusion model, but a FLUX.2 VAE was expected" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_published_sha256_is_checked(tmp_path, monkeypatch, vae_bytes):
    fake_modelscope(monkeypatch, vae_bytes)
    wrong = dataclasses.replace(downloads.VAE, sha256="0" * 64)
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(wrong, model_dir=tmp_path)
    actual = hashlib.sha256(vae_bytes).hexdigest()
    assert f"(SHA-256 is {actual}, expected {'0' * 64} (the file is corrupt))" in one_line(err)
    assert list(tmp_path.iterdir()) == []
    right = dataclasses.replace(downloads.VAE, sha256=actual)
    assert downloads.resolve_model_file(right, model_dir=tmp_path).read_bytes() == vae_bytes


def test_bad_file_already_at_the_download_target_says_delete_it_and_run_again(tmp_path, vae_bytes):
    target = tmp_path / "flux2_vae.safetensors"
    target.write_bytes(vae_bytes[:-10])
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.VAE, model_dir=tmp_path)
    message = one_line(err)
    assert message.startswith(f"{target}: not a readable safetensors file")
    assert message.endswith("this is where the FLUX.2 VAE is downloaded to: delete it and run again to download it afresh")
    assert target.read_bytes() == vae_bytes[:-10]  # reported, never deleted behind the user's back


def test_failure_reason_is_cut_between_words(tmp_path, monkeypatch):
    words = " ".join(f"word{i:03d}" for i in range(60))  # 479 characters
    fake_modelscope(monkeypatch, error=ConnectionError(f"HTTPSConnectionPool failed:\n{words}"))
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_file(downloads.DIT, model_dir=tmp_path)
    message = one_line(err)
    reason = message.split("download from ModelScope failed (", 1)[1].split(" ...);", 1)[0]
    assert reason.startswith("HTTPSConnectionPool failed: word000 word001")
    assert reason.split()[-1] in words.split() and len(reason) <= 200


def test_all_missing_files_are_named_in_one_error_after_one_failed_download(tmp_path, monkeypatch, vae_bytes):
    calls = fake_modelscope(monkeypatch, error=ConnectionError("Failed to resolve 'modelscope.cn'"))
    given = tmp_path / "my_vae.safetensors"
    given.write_bytes(vae_bytes)
    with pytest.raises(ModelFileError) as err:
        downloads.resolve_model_files({"text_encoder": None, "dit": None, "vae": given}, model_dir=tmp_path / "models")
    message = one_line(err)
    assert calls == ["Qwen/Qwen3-0.6B"]  # offline: the DiT is not tried after the first failure
    assert message.startswith("2 model files are missing or bad: (1) Qwen3-0.6B text encoder not found at ")
    assert "failed (Failed to resolve 'modelscope.cn')" in message
    assert f"(2) AAADiT not found at {tmp_path / 'models' / 'aaa_dit_step-600000.safetensors'} (not downloaded)" in message
    assert "'step-600000.safetensors' from https://modelscope.cn/models/DiffSynth-Studio/AAAMyModel/files" in message
    assert err.value.settings == ("text_encoder", "dit")  # what to change, for each front end to name its own way
    assert " --" not in message and "explicitly" not in message


def test_unwritable_model_folder_is_named_before_any_download():
    """As a non-root user: a model folder owned by root, one that cannot be created inside it, one that cannot be entered."""
    with shared_folder() as folder:
        locked = folder / "locked"
        locked.mkdir(mode=0o600)
        out = run_unprivileged(
            "from aaa_core import downloads\n"
            "for model_dir in (%r, %r, %r):\n"
            "    try:\n"
            "        downloads.resolve_model_file(downloads.VAE, model_dir=model_dir)\n"
            "    except Exception as err:\n"
            "        print(type(err).__name__, err)\n" % (str(folder), str(folder / "sub"), str(locked))
        )
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[2] == (
        f"ModelFileError {locked / 'flux2_vae.safetensors'}: permission denied: this user cannot look inside the "
        f"folder {locked} (it needs search permission)"
    )
    assert lines[0].startswith(
        f"ModelFileError {folder}: the model folder is not writable by this user, so the FLUX.2 VAE cannot be "
        "downloaded into it; use a writable model folder, or get 'vae/diffusion_pytorch_model.safetensors'"
    )
    assert lines[1].startswith(f"ModelFileError {folder / 'sub'}: cannot create the model folder (Permission denied)")


def test_loader_node_reports_a_bad_official_file_in_its_folder(tmp_path, monkeypatch, vae_bytes):
    """The official name is where the node downloads to; a bad file there is reported, not loaded."""
    from node_helpers import errors, one_line_error, use_model_dirs
    from pack_import import node

    (tmp_path / "flux2_vae.safetensors").write_bytes(vae_bytes[:100])
    use_model_dirs(monkeypatch, {"vae": [tmp_path]})
    with pytest.raises(errors.ModelFileError) as err:
        node("AAAVAELoader")("flux2_vae.safetensors", "auto")
    assert one_line_error(err).endswith("delete it and run again to download it afresh")
