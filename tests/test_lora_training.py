"""LoRA fine-tuning on tiny models (CPU, ~15 s on two cores).

Covers: the loss falls while the base stays frozen, the saved file holds only kohya adapter
tensors with its metadata, samples show the base beside the adapted model, bit-exact resume after
Ctrl-C, the merged export equals base + LoRA at strength 1 (the unmerged adapter forward), and
bad LoRA options or states are one-line errors. ComfyUI's own loader reading these files is in
test_native_model_in_comfyui.py.
"""

import importlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from aaa_core import downloads
from aaa_core.checkpoint import read_safetensors
from aaa_core.dit import load_dit
from aaa_core.errors import InputError
from test_dit import reference_key_shapes
from test_training import argv, dataset, models, run, run_interrupted  # noqa: F401 (fixtures)
from tiny_models import TINY_DIT, save_tiny_dit
from training import export
from training.cache import file_sha256
from training.config import parse_config
from training.lora import LoraAdapters, add_adapters
from training.state_files import load_tree
from training.train import main

RANK = 4
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff.0", "ff.2")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A model folder whose 'published' DiT is a tiny one (what --init-from published finds once downloaded)."""
    folder = tmp_path_factory.mktemp("published")
    save_tiny_dit(folder / downloads.DIT.local_name, seed=3)
    return folder


def lora_args(published, *extra):
    return ["--init-from", "published", "--model-dir", published, "--lora-rank", RANK, "--lr", 1e-2, "--warmup-steps", 0, *extra]


@pytest.fixture(scope="module")
def trained(models, dataset, published, tmp_path_factory):  # noqa: F811
    """A 40-step LoRA run with samples at the end."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, run(models, dataset, out, *lora_args(published, "--max-steps", 40, "--batch-size", 6, "--sample-every", 40,
                                                     "--sample-steps", 2, "--lora-alpha", 8))


def test_lora_training_lowers_the_loss_and_saves_only_adapters(trained, published):
    out, summary = trained
    losses = [loss for _, loss in summary.losses]
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])  # 3.65 -> 2.92

    assert summary.checkpoint == out / "checkpoints" / "run-lora-step-000040.safetensors"
    tensors, metadata = read_safetensors(summary.checkpoint)
    stems = {f"lora_unet_blocks_{b}_{t.replace('.', '_')}" for b in range(TINY_DIT.depth) for t in DEFAULT_TARGETS}
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(tensors) == {stem + s for stem in stems for s in suffixes}  # adapters only, no base weight
    assert tensors["lora_unet_blocks_0_to_q.lora_down.weight"].shape == (RANK, TINY_DIT.dim)
    assert tensors["lora_unet_blocks_1_ff_2.lora_up.weight"].shape == (TINY_DIT.dim, RANK)
    assert float(tensors["lora_unet_blocks_0_to_q.alpha"]) == 8.0
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    base_file = published / downloads.DIT.local_name
    assert summary.checkpoint.stat().st_size < 0.2 * base_file.stat().st_size
    assert metadata["aaa_lora_base_sha256"] == file_sha256(base_file)
    assert (metadata["aaa_lora_rank"], metadata["aaa_lora_alpha"], metadata["aaa_step"]) == ("4", "8.0", "40")
    assert json.loads(metadata["aaa_lora_targets"]) == list(DEFAULT_TARGETS) and metadata["aaa_weights"] == "ema"

    # The state holds the adapters (kohya keys) and their AdamW moments, not the frozen base.
    state_weights, _ = read_safetensors(summary.state / "model.safetensors")
    assert set(state_weights) == {stem + s for stem in stems for s in suffixes[:2]}
    assert len(load_tree(summary.state / "optimizer.safetensors")["state"]) == len(state_weights)

    # Samples: the base model's grid (left) and the adapted one's (right), 4 prompts of 32x32 each.
    grid = Image.open(out / "samples" / "step-000040.png").convert("RGB")
    assert grid.size == (64 + 2 + 64, 64)
    left, right = np.asarray(grid)[:, :64].astype(int), np.asarray(grid)[:, 66:].astype(int)
    assert np.abs(left - right).mean() > 1  # the LoRA changed the images
    assert (out / "samples" / "prompts.txt").read_text(encoding="utf-8").startswith("left grid: the base model; right grid")


def test_merged_export_gives_the_dit_output_of_base_plus_lora(trained, published, tmp_path, caplog):
    _, summary = trained
    base_file = published / downloads.DIT.local_name
    merged_file = tmp_path / "merged.safetensors"
    assert export.main([str(summary.checkpoint), str(merged_file), "--base", "published", "--model-dir", str(published),
                        "--dtype", "fp32"]) == 0
    merged = load_dit(merged_file)

    # Base + LoRA at strength 1, unmerged: the adapters' own forward, loaded from the saved file.
    adapted = load_dit(base_file)
    adapters: LoraAdapters = add_adapters(adapted, DEFAULT_TARGETS, RANK, 8.0)
    lora, _ = read_safetensors(summary.checkpoint, dtype=torch.float32)
    adapters.load_state_dict({k: v for k, v in lora.items() if not k.endswith(".alpha")})
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 128, 2, 3, generator=gen), torch.randn(2, 5, TINY_DIT.text_dim, generator=gen)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        expected, got, base_out = adapted(latents, text, t), merged(latents, text, t), load_dit(base_file)(latents, text, t)
    assert (expected - base_out).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # The default: bf16 in the published key format.
    assert export.main([str(summary.checkpoint), str(tmp_path / "bf16.safetensors"), "--base", str(base_file)]) == 0
    tensors, _ = read_safetensors(tmp_path / "bf16.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == reference_key_shapes(dim=64, depth=2, latent=128, text=32)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())

    # A LoRA without --base, a LoRA run's state, another base: named.
    assert export.main([str(summary.checkpoint), str(tmp_path / "x.safetensors")]) == 1
    assert "merging a LoRA needs the checkpoint it applies to: pass --base" in caplog.text
    assert export.main([str(summary.state), str(tmp_path / "y.safetensors")]) == 1
    assert f"{summary.state}: is a LoRA run's state" in caplog.text
    other = save_tiny_dit(tmp_path / "other.safetensors", seed=9)
    assert export.main([str(summary.checkpoint), str(tmp_path / "z.safetensors"), "--base", str(other)]) == 0
    assert "was trained on another base (aaa_dit_step-600000.safetensors)" in caplog.text
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_lora_resume_after_ctrl_c_matches_uninterrupted_run(models, dataset, published, tmp_path, monkeypatch, caplog):  # noqa: F811
    options = lora_args(published, "--max-steps", 6, "--batch-size", 3, "--ema-decay", 0.9, "--save-dtype", "fp32")
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO)
    full = run(models, dataset, tmp_path / "full", *options, cache=cache)

    interrupted = run_interrupted(monkeypatch, models, dataset, tmp_path / "split", *options, cache=cache, at_loss_call=3)
    assert interrupted.stopped and interrupted.step == 3

    resumed = run(models, dataset, tmp_path / "split", *options, "--resume", cache=cache)
    assert resumed.step == 6 and resumed.losses[-1] == full.losses[-1]
    assert caplog.text.count(f"hashing {published}") == 1  # the base is hashed once, then remembered in the cache
    for name in ("model.safetensors", "ema.safetensors"):
        a, _ = read_safetensors(full.state / name)
        b, _ = read_safetensors(resumed.state / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    a, _ = read_safetensors(full.checkpoint)
    b, _ = read_safetensors(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Other adapters, another base or full training cannot continue this state.
    for extra, expected in [
        (["--lora-rank", 8], "was trained with LoRA rank 4, this run has 8"),
        (["--lora-targets", "to_q"], "was trained with LoRA targets"),
        (["--init-from", save_tiny_dit(tmp_path / "other.safetensors", seed=9)], "was trained with a base checkpoint (--init-from)"),
        (["--lora-rank", 0, "--init-from", ""], "is from a LoRA run (rank 4); resume it with the same --lora-rank"),
    ]:
        with pytest.raises(InputError) as excinfo:
            run(models, dataset, tmp_path / "split", *options, "--resume", "--max-steps", 8, *extra, cache=cache)
        assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)

    progress_file = resumed.state / "progress.json"
    progress_file.write_text(json.dumps({**json.loads(progress_file.read_text(encoding="utf-8")), "lora": 5}), encoding="utf-8")
    with pytest.raises(InputError, match="progress.json: 'lora' holds 5, expected the LoRA settings or null"):
        run(models, dataset, tmp_path / "split", *options, "--resume", "--max-steps", 8, cache=cache)


def test_bad_lora_options_are_one_line_errors(models, dataset, published, tmp_path, caplog, monkeypatch):  # noqa: F811
    with pytest.raises(InputError, match="--lora-rank trains adapters on a base model: pass --init-from published or FILE"):
        parse_config(argv(models, dataset, tmp_path / "a", "--lora-rank", 4))
    assert main(argv(models, dataset, tmp_path / "b", *lora_args(published, "--lora-targets", "to_q", "attn.qkv"))) == 1
    assert "--lora-targets: 'attn.qkv' names no linear layer of AAADiT" in caplog.text

    def offline(*args, **kwargs):
        raise ConnectionError("modelscope.cn is unreachable")

    monkeypatch.setattr(importlib.import_module("modelscope.hub.snapshot_download"), "snapshot_download", offline)
    assert main(argv(models, dataset, tmp_path / "c", *lora_args(tmp_path / "empty"))) == 1
    assert "the download from ModelScope failed (modelscope.cn is unreachable)" in caplog.text
