"""The headless CLI end to end with tiny model files, and its one-line errors."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aaa_core.cli import main
from aaa_core.dit import load_dit
from aaa_core.pipeline import AAAPipeline, GenerationSettings
from aaa_core.sampling import make_noise, sample
from aaa_core.text_encoder import load_text_encoder
from aaa_core.vae import load_vae
from tiny_models import save_tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def model_args(models):
    return ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])]


def run(args, capsys):
    """Runs the CLI in-process; returns (exit code, stderr)."""
    code = main(["generate", *args])
    return code, capsys.readouterr().err


def test_module_entry_point_writes_a_png_with_its_settings(models, tmp_path):
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "aaa_core", "generate", "--prompt", "a green lizard", "--steps", "3",
         "--width", "64", "--height", "32", "--seed", "5", *model_args(models), "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (64, 32)
        assert "'a green lizard'" in image.text["parameters"] and "seed: 5" in image.text["parameters"]


@pytest.mark.parametrize("native_bf16, dtype", [("1", "bf16"), ("0", "fp32")])
def test_auto_dtype_on_the_cpu_is_bfloat16_where_it_is_native(models, tmp_path, capsys, monkeypatch, native_bf16, dtype):
    monkeypatch.setenv("AAA_CPU_BF16", native_bf16)
    out = tmp_path / "auto.png"
    code, err = run(["--prompt", "x", "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu",
                     "--dtype", "auto", *model_args(models), "--output", str(out)], capsys)
    assert code == 0, err
    with Image.open(out) as image:
        assert image.size == (32, 32)
        assert f"dtype: '{dtype}'" in image.text["parameters"]
        assert f'"weight_dtype": "{dtype}"' in image.text["prompt"]  # the graph that regenerates it loads in that dtype


def test_cli_image_equals_the_core_computation(models, tmp_path, capsys):
    """The CLI adds nothing to the numbers: same seed, same pixels as calling aaa_core directly."""
    out = tmp_path / "cli.png"
    code, err = run(["--prompt", "red dragon", "--steps", "4", "--cfg", "6", "--width", "32", "--height", "48",
                     *model_args(models), "--output", str(out)], capsys)
    assert code == 0, err
    encoder, dit, vae = load_text_encoder(models["text_encoder"]), load_dit(models["dit"]), load_vae(models["vae"])
    embeds = encoder.encode(["red dragon", " "])
    latents = sample(dit, make_noise(0, 1, 3, 2), embeds[:1], embeds[1:], steps=4, cfg=6.0)
    from aaa_core.images import tensor_to_pil

    expected = np.array(tensor_to_pil(vae.decode(latents))[0])
    assert np.array_equal(np.array(Image.open(out)), expected)


def test_batch_writes_numbered_files_that_equal_single_runs(models, tmp_path, capsys):
    code, err = run(["--prompt", "x", "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2",
                     "--seed", "10", *model_args(models), "--output", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b_0.png", "b_1.png"]
    code, err = run(["--prompt", "x", "--steps", "2", "--width", "32", "--height", "32", "--seed", "11",
                     *model_args(models), "--output", str(tmp_path / "single.png")], capsys)
    assert code == 0, err
    # Image 1 of a batch seeded 10 is the image of seed 11 (up to batched-matmul rounding).
    diff = np.abs(np.array(Image.open(tmp_path / "b_1.png"), dtype=int) - np.array(Image.open(tmp_path / "single.png"), dtype=int))
    assert diff.max() <= 1


def test_image_to_image_runs_and_keeps_structure(models, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(source)
    code, err = run(["--prompt", "x", "--steps", "3", "--width", "32", "--height", "32", "--image", str(source),
                     "--denoise", "0.3", *model_args(models), "--output", str(tmp_path / "i2i.png")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "i2i.png").size == (32, 32)


def test_pipeline_low_denoise_stays_closer_to_the_input_than_high_denoise(models):
    pipe = AAAPipeline.from_files(models["dit"], models["vae"], models["text_encoder"], device="cpu", dtype="float32")
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    low, high = (
        np.array(pipe.generate(GenerationSettings(prompt="x", steps=4, width=32, height=32, denoise=d), source)[0], dtype=float)
        for d in (0.2, 1.0)
    )
    reconstruction = np.array(pipe.generate(GenerationSettings(prompt="x", steps=4, width=32, height=32, denoise=0.05), source)[0], dtype=float)
    assert np.abs(low - reconstruction).mean() < np.abs(high - reconstruction).mean()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--width", "250"], "error: --width 250 is not a positive multiple of 16; try 256"),
        (["--steps", "0"], "error: --steps 0: must be between 1 and 10000"),
        (["--denoise", "0.5"], "error: denoise 0.5 needs an input image"),
        (["--image", "missing.png"], "missing.png: image not found"),
        (["--output", "out.jpg"], "out.jpg: must end in .png"),
    ],
)
def test_bad_options_fail_before_loading_any_model(tmp_path, capsys, monkeypatch, extra, message):
    """The model paths do not exist: had the CLI loaded models first, it would complain about them."""
    monkeypatch.chdir(tmp_path)
    absent = {"dit": "no-dit", "vae": "no-vae", "text_encoder": "no-te"}
    code, err = run(["--prompt", "x", *model_args(absent), "--output", "out.png", *extra], capsys)
    assert code == 1
    assert message in err
    assert err.count("\n") == 1  # one line, no traceback
    assert list(tmp_path.iterdir()) == []


def test_wrong_missing_and_corrupt_model_files_give_one_line_errors(models, tmp_path, capsys):
    out = tmp_path / "out.png"
    base = ["--prompt", "x", "--steps", "1", "--width", "16", "--height", "16", "--output", str(out)]

    code, err = run([*base, "--dit", str(models["vae"]), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])], capsys)
    assert code == 1 and "holds a FLUX.2 VAE, but an AAADiT diffusion model was expected" in err and err.count("\n") == 1

    code, err = run([*base, "--dit", str(tmp_path / "none.safetensors"), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])], capsys)
    assert code == 1 and "none.safetensors: AAADiT file not found" in err

    truncated = tmp_path / "truncated.safetensors"
    data = models["dit"].read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    code, err = run([*base, "--dit", str(truncated), "--vae", str(models["vae"]), "--text-encoder", str(models["text_encoder"])], capsys)
    assert code == 1 and "truncated.safetensors: not a readable safetensors file" in err and err.count("\n") == 1
    truncated.unlink()
    assert list(tmp_path.iterdir()) == []  # no partial image


def test_existing_output_survives_a_failed_run(models, tmp_path, capsys):
    out = tmp_path / "keep.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    bad_dit = tmp_path / "bad.safetensors"
    shutil.copy(models["vae"], bad_dit)
    code, _ = run(["--prompt", "x", "--dit", str(bad_dit), "--vae", str(models["vae"]),
                   "--text-encoder", str(models["text_encoder"]), "--output", str(out)], capsys)
    assert code == 1
    assert np.array(Image.open(out))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_pipelines_run_on_the_cpu_and_track_float32(models, dtype):
    """All three models in bf16/fp16 on the CPU: finite output close to the float32 image."""
    settings = GenerationSettings(prompt="red dragon", steps=3, cfg=4.0, width=32, height=32)
    reference = AAAPipeline.from_files(models["dit"], models["vae"], models["text_encoder"], device="cpu", dtype="float32")
    half = AAAPipeline.from_files(models["dit"], models["vae"], models["text_encoder"], device="cpu", dtype=dtype)
    assert str(half.dtype) == f"torch.{dtype}" and half.vae.dtype == half.dtype
    expected = np.array(reference.generate(settings)[0], dtype=float)
    actual = np.array(half.generate(settings)[0], dtype=float)
    other_seed = np.array(reference.generate(dataclasses.replace(settings, seed=1))[0], dtype=float)
    # Rounding (well under 1/255 on average here), not a different image (about 28/255 for another seed).
    assert np.abs(actual - expected).mean() < 0.1 * np.abs(other_seed - expected).mean()
