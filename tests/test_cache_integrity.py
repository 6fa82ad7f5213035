"""The training cache's entries are checked when read, and its keys cover every input of an encoding.

Each kind of damage is planted into real entries of a tiny run; the next run must name the
entry, encode it again to exactly what a fresh encoding gives, and train.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import aaa_core.checkpoint
from aaa_core.errors import InputError
from aaa_core.outputs import temp_path_for
from aaa_core.text_encoder import ASSETS_DIR
from test_training import argv
from tiny_models import save_tiny_models, save_tiny_vae
from training.cache import EncodingCache, file_sha256, tensor_sha256
from training.config import parse_config
from training.train import main, train

RESOLUTION = 32


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def write_pairs(folder, count: int):
    """``count`` random 32x32 images, each with its own caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"creature number {i}", encoding="utf-8")
    return folder


def cache_of(model_files, root, dtype=torch.float32, resolution=RESOLUTION, vae=None, text_encoder=None):
    return EncodingCache(root, vae or model_files["vae"], text_encoder or model_files["text_encoder"], resolution, dtype)


def _save(path, tensor, kind, checksum_of=None):
    """Writes an entry holding ``tensor`` with the checksum of ``checksum_of`` (default: itself)."""
    checksum = tensor_sha256(tensor if checksum_of is None else checksum_of)
    save_file({kind: tensor.contiguous()}, str(path), metadata={"format": "pt", "sha256": checksum})


def _nan(tensor):
    damaged = tensor.clone()
    damaged.view(-1)[5] = float("nan")
    return damaged


def _nudged(tensor):
    damaged = tensor.clone()
    damaged.view(-1)[0] += 0.25
    return damaged


# How each kind of damage is made from the intact file, and what the warning must say about it.
DAMAGE = {
    "truncated": (lambda path, t, kind: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "is not a readable safetensors file"),
    "empty": (lambda path, t, kind: path.write_bytes(b""), "is not a readable safetensors file"),
    "random bytes": (lambda path, t, kind: path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size)), "is not a readable safetensors file"),
    "wrong shape": (lambda path, t, kind: _save(path, t[:, :1], kind), "has shape"),
    "wrong dtype": (lambda path, t, kind: _save(path, t.to(torch.bfloat16), kind), "has dtype torch.bfloat16, expected torch.float32"),
    "NaN inside": (lambda path, t, kind: _save(path, _nan(t), kind), "holds NaN or infinite values"),
    "checksum mismatch": (lambda path, t, kind: _save(path, _nudged(t), kind, checksum_of=t), "does not match its checksum"),
    "no checksum": (lambda path, t, kind: save_file({kind: t}, str(path)), "has no checksum"),
}


def test_every_kind_of_damaged_entry_is_named_and_encoded_again(model_files, tmp_path, caplog):
    data = write_pairs(tmp_path / "data", len(DAMAGE))
    cache_dir = tmp_path / "cache"
    first = train(parse_config(argv(model_files, data, tmp_path / "a", "--max-steps", 1, cache=cache_dir)))
    assert (first.cache.images_encoded, first.cache.prompts_encoded) == (len(DAMAGE), len(DAMAGE))

    cache = cache_of(model_files, cache_dir)
    planted = []  # (damage, kind, source, entry path, fresh tensor)
    for i, (damage, (plant, _)) in enumerate(DAMAGE.items()):
        image, caption = data / f"img{i}.png", f"creature number {i}"
        for kind, key, source in (("latents", cache.latent_key(file_sha256(image)), image.name),
                                  ("text", cache.text_key(caption), caption)):
            path = cache.path(kind, key)
            fresh = cache.load(kind, key, source)
            assert fresh is not None
            plant(path, fresh, kind)
            planted.append((damage, kind, source, path, fresh))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = train(parse_config(argv(model_files, data, tmp_path / "b", "--max-steps", 1, cache=cache_dir)))
    assert second.step == 1 and second.checkpoint.is_file()  # the run trains as usual
    assert (second.cache.images_encoded, second.cache.prompts_encoded) == (len(DAMAGE), len(DAMAGE))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache entry" in r.getMessage()]
    assert len(warnings) == len(planted)
    for damage, kind, source, path, fresh in planted:
        message = next((m for m in warnings if str(path) in m), None)
        assert message is not None, f"no warning names the {damage} {kind} entry {path}"
        assert source in message and DAMAGE[damage][1] in message and "encoding it again" in message, message
        again = cache.load(kind, path.stem, source)
        assert again is not None, f"the {damage} {kind} entry was not rewritten intact"
        torch.testing.assert_close(again, fresh, rtol=0, atol=1e-6)


def test_prompt_key_covers_the_text_encoders_config_and_tokenizer_files(model_files, tmp_path):
    encoder = tmp_path / "qwen"
    shutil.copytree(model_files["text_encoder"].parent, encoder)
    weights = encoder / model_files["text_encoder"].name
    key = lambda: cache_of(model_files, tmp_path / "cache", text_encoder=weights).text_key("a prompt")  # noqa: E731

    original = key()
    assert key() == original  # nothing changed: the same key

    config = json.loads((encoder / "config.json").read_text(encoding="utf-8"))
    config["rope_theta"] = 10_000
    (encoder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    new_rope = key()
    assert new_rope != original

    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):  # the packaged tokenizer, now beside the weights
        shutil.copy(ASSETS_DIR / name, encoder / name)
    assert key() == new_rope  # the same files as the packaged tokenizer: the same embeddings
    tokenizer_config = json.loads((encoder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (encoder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    assert key() != new_rope


def test_latent_key_covers_the_vae_file_resolution_and_dtype(model_files, tmp_path):
    image_sha = "0" * 64
    base = cache_of(model_files, tmp_path / "cache").latent_key(image_sha)
    other_vae = save_tiny_vae(tmp_path / "other_vae.safetensors", seed=1)
    assert cache_of(model_files, tmp_path / "cache", vae=other_vae).latent_key(image_sha) != base
    assert cache_of(model_files, tmp_path / "cache", resolution=64).latent_key(image_sha) != base
    assert cache_of(model_files, tmp_path / "cache", dtype=torch.bfloat16).latent_key(image_sha) != base
    assert cache_of(model_files, tmp_path / "cache").latent_key(image_sha) == base


def test_damaged_model_fingerprint_memo_is_rebuilt(model_files, tmp_path):
    memo = tmp_path / "cache" / "model_fingerprints.json"
    base = cache_of(model_files, tmp_path / "cache").vae_id
    vae = model_files["vae"]
    stale = {str(vae.resolve()): {"size": vae.stat().st_size, "mtime_ns": vae.stat().st_mtime_ns, "sha256": 5}}
    for garbage in ("[1, 2]", '{"x": 1}', "not json", json.dumps(stale)):
        memo.write_text(garbage, encoding="utf-8")
        assert cache_of(model_files, tmp_path / "cache").vae_id == base
        assert json.loads(memo.read_text(encoding="utf-8"))[str(vae.resolve())]["sha256"] == base


def test_entries_are_written_atomically_and_never_non_finite(model_files, tmp_path, monkeypatch):
    cache = cache_of(model_files, tmp_path / "cache")
    nan_latent = torch.zeros(128, 2, 2)
    nan_latent[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"encoding image img\.png gave a tensor that holds NaN or infinite values"):
        cache.write("latents", "ab" * 32, nan_latent, "img.png")

    def killed_while_writing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(aaa_core.checkpoint, "save_file", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        cache.write("text", "cd" * 32, torch.zeros(128, 32), "a prompt")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "model_fingerprints.json"] == []


def test_a_cache_dir_that_cannot_be_written_is_one_line(model_files, tmp_path, caplog):
    data = write_pairs(tmp_path / "data", 1)
    (tmp_path / "taken").write_text("a file, not a folder", encoding="utf-8")
    code = main(argv(model_files, data, tmp_path / "run", "--max-steps", 1, cache=tmp_path / "taken"))
    assert code == 1
    assert "model_fingerprints.json: cannot write to the encoding cache" in caplog.text
    assert "pass a writable --cache-dir" in caplog.text


def test_temp_files_of_a_killed_encoding_are_swept(model_files, tmp_path, caplog):
    data = write_pairs(tmp_path / "data", 1)
    cache_dir = tmp_path / "cache"
    train(parse_config(argv(model_files, data, tmp_path / "a", "--max-steps", 1, cache=cache_dir)))
    cache = cache_of(model_files, cache_dir)
    entry = cache.path("latents", cache.latent_key(file_sha256(data / "img0.png")))
    left_over = [temp_path_for(entry), temp_path_for(cache_dir / "model_fingerprints.json")]  # as a killed writer leaves them
    for temp in left_over:
        temp.write_bytes(b"half an entry")
    others = entry.parent / ".notes.tmp"  # a user's own hidden file is not ours to delete
    others.write_text("mine")

    with caplog.at_level(logging.INFO):
        train(parse_config(argv(model_files, data, tmp_path / "b", "--max-steps", 1, cache=cache_dir)))
    assert not any(temp.exists() for temp in left_over)
    assert others.read_text() == "mine" and entry.is_file()
    for temp in left_over:
        assert f"deleted {temp} (left by an interrupted encoding)" in caplog.text


def test_ctrl_c_while_encoding_keeps_finished_entries_and_says_so(model_files, tmp_path, monkeypatch, caplog):
    """The stop request is honoured between encoding batches: exit 130, the message says what was kept
    (not "the newest saved state", there is none), and no temp or partial entry is left."""
    data = write_pairs(tmp_path / "data", 4)
    checks = iter([False, True])  # Ctrl-C arrives while the first batch of two images is encoded
    monkeypatch.setattr("training.interrupt.StopRequest.__call__", lambda self: next(checks, True))
    code = main(argv(model_files, data, tmp_path / "run", "--encode-batch-size", 2))
    assert code == 130
    assert "stopped while filling the encoding cache; the entries encoded so far are kept" in caplog.text
    assert "newest saved state" not in caplog.text
    memos = ("model_fingerprints.json", "image_facts.json")
    entries = [p for p in (tmp_path / "run" / "cache").rglob("*") if p.is_file() and p.name not in memos]
    assert len(entries) == 2 and all(p.suffix == ".safetensors" for p in entries), entries
    assert not (tmp_path / "run" / "states").exists() and not (tmp_path / "run" / "checkpoints").exists()
