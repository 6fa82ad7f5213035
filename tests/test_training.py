"""The trainer end to end on tiny models and a tiny generated data set (CPU, ~25 s on two cores).

Covers: the loss against the reference scheduler's own formulas, learning, the checkpoint
format, bit-exact resume after Ctrl-C, the encoding cache (reuse and targeted invalidation),
bad inputs reported by name, data layouts, the data order, the config file, fine-tuning.
"""

import importlib
import logging
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from PIL import Image

import training.encoding
import training.train
from aaa_core.checkpoint import read_header, read_safetensors
from aaa_core.dit import AAADiT, AAADiTConfig, load_dit
from aaa_core.errors import InputError
from aaa_core.scheduler import TrainingSchedule
from test_dit import reference_key_shapes
from tiny_models import TINY_DIT, save_tiny_dit, save_tiny_models
from training.batches import BatchOrder
from training.checkpoints import export_weights
from training.config import TrainConfig, parse_config
from training.pairs import find_samples
from training.loss import flow_matching_loss
from training.state_files import load_tree
from training.train import main, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "64", "--depth", "2", "--num-heads", "4", "--resolution", "32"]


# --------------------------------------------------------------------------------------
# Fixtures: tiny models and a data set with one transparent, one broken, one uncaptioned image
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def write_dataset(folder: Path) -> Path:
    """Six captioned RGB images of assorted sizes, a transparent PNG, a broken file, an uncaptioned image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (40, 48), (64, 32), (32, 64), (36, 36), (48, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"creature {i}, {'red' if i % 2 else 'blue'}, small", encoding="utf-8")
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((32, 32)) > 0.5, 255, 0)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    (folder / "transparent.txt").write_text("transparent creature", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "broken.txt").write_text("broken creature", encoding="utf-8")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "uncaptioned.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def argv(models, data, out, *extra, cache=None):
    """A tiny, fast run: tiny DiT, 32x32 images, batch 4, no samples unless asked."""
    args = [
        "--data", str(data), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"]),
        "--output-dir", str(out), *TINY, "--batch-size", "4", "--lr", "1e-3", "--log-every", "1",
        "--sample-every", "0", "--no-tensorboard", "--max-steps", "4",
    ]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    return args + [str(a) for a in extra]


def run(*args, **kwargs):
    return train(parse_config(argv(*args, **kwargs)))


def run_interrupted(monkeypatch, *args, at_loss_call: int, **kwargs):
    """``run`` that gets a real Ctrl-C (SIGINT) during its ``at_loss_call``-th loss computation."""
    calls = {"n": 0}
    real_loss = training.train.flow_matching_loss

    def loss_then_ctrl_c(*loss_args, **loss_kwargs):
        calls["n"] += 1
        if calls["n"] == at_loss_call:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*loss_args, **loss_kwargs)

    monkeypatch.setattr(training.train, "flow_matching_loss", loss_then_ctrl_c)
    try:
        return run(*args, **kwargs)
    finally:
        monkeypatch.setattr(training.train, "flow_matching_loss", real_loss)


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_timesteps", [False, True])
def test_batched_loss_equals_reference_per_sample_formula(reference_timesteps):
    """One batch, one timestep per sample == the reference's batch-1 loss, sample by sample
    (docs/diffsynth-aaa.md section 3)."""
    from diffsynth.diffusion import FlowMatchScheduler

    reference = FlowMatchScheduler("FLUX.2")
    reference.set_timesteps(1000, training=True)
    torch.manual_seed(0)
    model = AAADiT(AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32))
    latents, noise = torch.randn(5, 128, 2, 2), torch.randn(5, 128, 2, 2)
    text = torch.randn(5, 16, 32)
    indices = torch.tensor([0, 3, 301, 640, 999])

    ours = flow_matching_loss(model, latents, text, indices, noise, TrainingSchedule.flux2(), reference_timesteps)

    expected = []
    for i, index in enumerate(indices):
        t = reference.timesteps[index : index + 1]
        if reference_timesteps:
            t = t.to(torch.bfloat16)  # what FlowMatchSFTLoss does with pipe.torch_dtype = bf16
        x0, eps = latents[i : i + 1], noise[i : i + 1]
        noisy = reference.add_noise(x0, eps, t)
        target = reference.training_target(x0, eps, t)
        loss = F.mse_loss(model(noisy, text[i : i + 1], t).float(), target.float()) * reference.training_weight(t)
        expected.append(loss)
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-6, atol=1e-7)
    assert ours[0] == 0  # sigma = 1 has weight 0 (section 2.3)
    if reference_timesteps:
        assert ours[1] == 0  # bf16 rounding sends index 3 to sigma = 1 as well (section 13, item 1)
    else:
        assert ours[1] > 0


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_training_learns_and_writes_loadable_checkpoints(models, dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    summary = run(models, dataset, out, "--max-steps", 40, "--batch-size", 6, "--sample-every", 20,
                  "--tensorboard", "--save-every", 20, "--warmup", "linear", "--warmup-steps", 3)

    # Learning: the mean loss of the last 10 steps is well below that of the first 10.
    losses = [loss for _, loss in summary.losses]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])  # 0.39-0.49 over seeds 0-5

    # Checkpoints: the reference key set, strictly loadable, with config and step in the metadata.
    assert summary.checkpoint == out / "checkpoints" / "run-step-000040.safetensors"
    assert (out / "checkpoints" / "run-step-000020.safetensors").is_file()
    tensors, metadata = read_safetensors(summary.checkpoint)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes == reference_key_shapes(dim=64, depth=2, latent=128, text=32)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    assert metadata["aaa_step"] == "40" and metadata["aaa_weights"] == "ema"
    model = load_dit(summary.checkpoint)
    assert model.config == AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32)

    # Feedback: sample grids, TensorBoard events, the log file, the resolved config.
    assert (out / "samples" / "step-000020.png").is_file() and (out / "samples" / "step-000040.png").is_file()
    assert Image.open(out / "samples" / "step-000040.png").size == (64, 64)  # 4 prompts of 32x32 in a 2x2 grid
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 40/40" in (out / "train.log").read_text(encoding="utf-8")
    assert parse_config(["--config", str(out / "config.toml")]).batch_size == 6

    # Bad inputs: skipped, named, counted; never fatal.
    assert sorted(s.name for s in summary.skipped) == ["broken.png", "uncaptioned.png"]
    text = caplog.text
    assert "skipped uncaptioned.png: no caption" in text and "skipped broken.png" in text
    assert "2 of 9 pairs skipped" in text
    assert sorted(p.name for p in (out / "states").iterdir()) == ["step-000020", "step-000040"]


def test_resume_after_ctrl_c_matches_uninterrupted_run(models, dataset, tmp_path, monkeypatch):
    """Interrupt at step 5 of 12 (SIGINT), resume, and get bit-identical weights, EMA and AdamW state."""
    options = ["--max-steps", 12, "--batch-size", 3, "--grad-accum", 2, "--ema-decay", 0.9]
    cache = tmp_path / "cache"
    full = run(models, dataset, tmp_path / "full", *options, cache=cache)

    # Call 9 is the first micro-batch of step 5 (2 per step).
    interrupted = run_interrupted(monkeypatch, models, dataset, tmp_path / "split", *options, cache=cache, at_loss_call=9)
    assert interrupted.stopped and interrupted.step == 5
    assert interrupted.state.name == "step-000005" and interrupted.checkpoint.name == "split-step-000005.safetensors"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = run(models, dataset, tmp_path / "split", *options, "--resume", cache=cache)
    assert resumed.step == 12 and not resumed.stopped
    for name in ("model.safetensors", "ema.safetensors"):
        a, _ = read_safetensors(full.state / name)
        b, _ = read_safetensors(resumed.state / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = load_tree(full.state / "optimizer.safetensors")["state"]
    opt_b = load_tree(resumed.state / "optimizer.safetensors")["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert resumed.losses[-1] == full.losses[-1]


def test_cache_is_reused_and_only_changed_entries_are_reencoded(models, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    loads = {"vae": 0, "text": 0}

    def counting(name, loader):
        def wrapped(*args, **kwargs):
            loads[name] += 1
            return loader(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(training.encoding, "load_vae", counting("vae", training.encoding.load_vae))
    monkeypatch.setattr(training.encoding, "load_text_encoder", counting("text", training.encoding.load_text_encoder))

    first = run(models, data, tmp_path / "a", "--max-steps", 1, cache=cache).cache
    assert (first.images_encoded, first.prompts_encoded) == (7, 8)  # 7 readable images, 8 captions (no sampling)
    assert loads == {"vae": 1, "text": 1}

    second = run(models, data, tmp_path / "b", "--max-steps", 1, cache=cache).cache
    assert (second.images_encoded, second.prompts_encoded) == (0, 0)
    assert loads == {"vae": 1, "text": 1}  # neither encoder loaded again (the broken image is retried without the VAE)

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(data / "img2.png")  # one image changes
    third = run(models, data, tmp_path / "c", "--max-steps", 1, cache=cache).cache
    assert (third.images_encoded, third.prompts_encoded) == (1, 0)
    assert loads == {"vae": 2, "text": 1}

    (data / "img4.txt").write_text("a new caption", encoding="utf-8")  # one caption changes
    fourth = run(models, data, tmp_path / "d", "--max-steps", 1, cache=cache).cache
    assert (fourth.images_encoded, fourth.prompts_encoded) == (0, 1)
    assert loads == {"vae": 2, "text": 2}


def test_fine_tune_starts_from_the_given_checkpoint(models, dataset, tmp_path):
    """--init-from reads the sizes from the file; with lr 0 the weights come back unchanged."""
    source = save_tiny_dit(tmp_path / "init.safetensors", seed=3)
    summary = run(models, dataset, tmp_path / "ft", "--init-from", source, "--lr", 0, "--max-steps", 1,
                  "--save-dtype", "fp32", "--dim", 1024)  # --dim is ignored: the file decides
    tensors, _ = read_safetensors(summary.checkpoint)
    original, _ = read_safetensors(source)
    assert load_dit(summary.checkpoint).config == TINY_DIT
    assert all(torch.equal(tensors[k], original[k]) for k in original)

    exported = export_weights(summary.state, tmp_path / "raw.safetensors", weights="raw", dtype="bf16")
    assert load_dit(exported).config == TINY_DIT


def test_auto_precision_and_encoders_are_bf16_on_a_cpu_with_native_bf16(models, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("AAA_CPU_BF16", "1")
    linear_outputs = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():  # training steps, not the encoders
            linear_outputs.add(output.dtype)

    # accelerate keeps one mixed-precision setting per process: start this run, and the next test, afresh.
    AcceleratorState._reset_state(reset_partial_state=True)
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = run(models, dataset, tmp_path / "bf16", "--max-steps", 2)
    finally:
        hook.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert linear_outputs == {torch.bfloat16}
    log_text = (tmp_path / "bf16" / "train.log").read_text(encoding="utf-8")
    assert "precision bf16" in log_text and "encoders in torch.bfloat16" in log_text  # the cache too, as the reference
    entry = next((tmp_path / "bf16" / "cache" / "latents").rglob("*.safetensors"))
    assert {info.dtype for info in read_header(entry)[0].values()} == {"BF16"}
    header, _ = read_header(summary.state / "model.safetensors")
    assert {info.dtype for info in header.values()} == {"F32"}  # the master weights stay float32
    assert all(math.isfinite(loss) for _, loss in summary.losses)


def test_module_entry_point_and_user_errors(models, tmp_path, caplog):
    result = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in result.stdout
    assert main(argv(models, tmp_path / "missing", tmp_path / "out")) == 1
    assert "training data not found" in caplog.text


def test_missing_model_files_are_named_at_once_with_the_options_that_pass_them(models, dataset, tmp_path, monkeypatch, caplog):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    # importlib: the modelscope.hub package re-exports a function of the same name as the module.
    monkeypatch.setattr(importlib.import_module("modelscope.hub.snapshot_download"), "snapshot_download", offline)
    args = [a for a in argv(models, dataset, tmp_path / "out") if a not in (str(models["vae"]), str(models["text_encoder"]))]
    args = [a for a in args if a not in ("--vae", "--text-encoder")] + ["--model-dir", str(tmp_path / "models"), "--init-from", "published"]
    caplog.clear()
    assert main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("3 model files are missing or bad: (1) FLUX.2 VAE not found at"), errors
    assert "(2) Qwen3-0.6B text encoder not found" in errors[0] and "(3) AAADiT not found" in errors[0]
    assert errors[0].endswith("; or pass a local file with --vae / --text-encoder / --init-from"), errors[0]


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def test_csv_layouts_including_pokemon_gen1(tmp_path):
    """data/metadata_merged.csv with paths relative to data/images; --data may be the folder or the CSV."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in ("001.png", "002.png"):
        Image.new("RGBA", (20, 20)).save(images / name)
    (tmp_path / "data" / "metadata_merged.csv").write_text(
        "image,prompt,extra\n001.png,\"green, lizard, plant\",x\n002.png,,y\n003.png,ghost,z\n", encoding="utf-8")
    for data in (tmp_path / "data", tmp_path / "data" / "metadata_merged.csv"):
        samples, skipped = find_samples(data)
        assert [(s.image, s.caption) for s in samples] == [(images / "001.png", "green, lizard, plant")]
        assert [(s.name, s.reason.split(" ")[0]) for s in skipped] == [("002.png", "empty"), ("003.png", "image")]
    with pytest.raises(InputError, match="needs columns"):
        (tmp_path / "bad.csv").write_text("file,text2\na.png,b\n", encoding="utf-8")
        find_samples(tmp_path / "bad.csv")


def test_batch_order_is_a_deterministic_permutation_per_epoch():
    square = torch.zeros(10, dtype=torch.long)  # one bucket
    order = [BatchOrder(square, 3, rank, 2, seed=7, device=torch.device("cpu")) for rank in (0, 1)]
    stream = torch.cat([torch.cat([o.indices(m) for o in order]) for m in range(10)])  # 60 positions = 6 epochs
    for epoch in range(6):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])  # a fresh shuffle every epoch
    again = BatchOrder(square, 3, 1, 2, seed=7, device=torch.device("cpu"))
    assert torch.equal(again.indices(7), order[1].indices(7))  # a pure function of (seed, step, rank)


def test_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('data = "x"\nbatch_size = 8\nlr = 1\nvalidation_prompts = ["a", "b"]\n', encoding="utf-8")
    cfg = parse_config(["--config", str(config), "--batch-size", "2", "--no-tensorboard"])
    assert (cfg.data, cfg.batch_size, cfg.lr, cfg.validation_prompts, cfg.tensorboard) == ("x", 2, 1.0, ["a", "b"], False)
    assert cfg.weight_decay == 0.01 and cfg.warmup_steps == 5 and cfg.max_grad_norm == 0  # reference defaults
    assert parse_config(["--config", str(config), "--resume"]).resume == "latest"
    pokemon = parse_config(["--config", str(REPO / "training" / "configs" / "pokemon.toml")])
    assert (pokemon.resolution, pokemon.lr, pokemon.weight_decay) == (256, 2e-4, 0.01)
    config.write_text('data = "x"\nbatch_sise = 8\n', encoding="utf-8")
    with pytest.raises(InputError, match="unknown option 'batch_sise'"):
        parse_config(["--config", str(config)])
    config.write_text('data = "x"\nbatch_size = "8"\n', encoding="utf-8")
    with pytest.raises(InputError, match="'batch_size' must be int"):
        parse_config(["--config", str(config)])
