"""The encoded data set at scale: buckets, the packed shards and the choice between memory and shards.

The tiny data set of test_training (32x32 images of assorted shapes) trains in three buckets
(32x32, 64x32, 32x64); the claims are exact: the two holders train bit for bit alike, a run
resumed on the shards equals an uninterrupted one in memory, and a pack is reused without the
per-entry cache or the encoders.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import training.cache
import training.encoded_data
import training.encoding
from aaa_core.checkpoint import read_safetensors
from aaa_core.dit import load_dit
from test_training import REPO, argv, run, run_interrupted, write_dataset
from training.train import main
from tiny_models import save_tiny_models
from training.buckets import assign_bucket, image_size, parse_buckets
from training.cache import EncodingCache
from training.encoded_data import plan_data

BUCKETS = "32x32,64x32,32x64"
OPTIONS = ["--buckets", BUCKETS, "--max-steps", 8, "--batch-size", 3, "--grad-accum", 2, "--ema-decay", 0.9]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def same_weights(a, b) -> bool:
    first, _ = read_safetensors(a)
    second, _ = read_safetensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_every_image_is_in_exactly_one_bucket_and_batches_keep_to_one(models, dataset, tmp_path):
    from training.pairs import find_samples

    samples, _ = find_samples(dataset)
    buckets = parse_buckets(BUCKETS, 32)
    cache = EncodingCache(tmp_path / "cache", models["vae"], models["text_encoder"], 32, torch.float32)
    plan = plan_data(samples, [], cache, buckets)
    readable = sorted(str(s.image) for s in samples if s.image.name != "broken.png")
    assert sorted(str(s.image) for s in plan.samples) == readable  # each once; the unreadable header is left out, named
    assert [(s.name, s.reason.split(" (")[0]) for s in plan.unreadable] == [("broken.png", "not a readable image")]
    assert all(b == assign_bucket(*image_size(s.image), buckets) for s, b in zip(plan.samples, plan.bucket_of))
    assert [plan.buckets[b] for b in plan.bucket_of] == [(32, 32)] * 5 + [(64, 32), (32, 64)]  # grouped by bucket
    # Cache keys follow the bucket: the square one is the key a square run always used.
    image_sha = "0" * 64
    assert cache.latent_key(image_sha, (32, 32)) == cache.latent_key(image_sha)
    assert len({cache.latent_key(image_sha, size) for size in ((32, 32), (64, 32), (32, 64))}) == 3


def test_shards_train_exactly_like_memory_and_resume_bit_exactly(models, dataset, tmp_path, monkeypatch, caplog):
    """Memory straight through; shards interrupted in step 4 (Ctrl-C) and resumed: the same weights."""
    caplog.set_level(logging.INFO)
    cache = tmp_path / "cache"
    full = run(models, dataset, tmp_path / "memory", *OPTIONS, "--data-loading", "memory", cache=cache)
    assert "data: 7 samples (32x32: 5, 64x32: 1, 32x64: 1)" in caplog.text and "held in memory on cpu" in caplog.text

    shards = ["--data-loading", "shards", "--data-workers", 1]
    split = run_interrupted(monkeypatch, models, dataset, tmp_path / "shards", *OPTIONS, *shards, cache=cache, at_loss_call=7)
    assert split.stopped and split.step == 4
    packs = list((cache / "packed").iterdir())
    assert len(packs) == 1
    assert sorted(p.name for p in packs[0].glob("*.safetensors")) == [
        "shard-32x32-00000.safetensors", "shard-32x64-00000.safetensors", "shard-64x32-00000.safetensors"]
    resumed = run(models, dataset, tmp_path / "shards", *OPTIONS, *shards, "--resume", cache=cache)
    assert resumed.step == 8 and not resumed.stopped
    assert resumed.losses[-1] == full.losses[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        assert same_weights(full.state / name, resumed.state / name), name
    assert same_weights(full.checkpoint, resumed.checkpoint)
    assert load_dit(resumed.checkpoint).config.dim == 64


def test_a_pack_is_reused_without_the_entries_or_the_encoders(models, tmp_path, monkeypatch, caplog):
    data = write_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    first = run(models, data, tmp_path / "a", "--data-loading", "shards", "--max-steps", 2, cache=cache)
    assert (first.cache.images_encoded, first.cache.prompts_encoded) == (7, 8)
    for kind in ("latents", "text"):
        shutil.rmtree(cache / kind)  # only the pack is left

    def no_encoder(*args, **kwargs):
        raise AssertionError("an encoder was loaded")

    monkeypatch.setattr(training.encoding, "load_vae", no_encoder)
    monkeypatch.setattr(training.encoding, "load_text_encoder", no_encoder)
    caplog.set_level(logging.WARNING)
    second = run(models, data, tmp_path / "b", "--data-loading", "shards", "--max-steps", 2, cache=cache)
    assert (second.cache.images_encoded, second.cache.prompts_encoded) == (0, 0)
    assert sorted(s.name for s in second.skipped) == ["broken.png", "uncaptioned.png"]  # still reported, from the index
    assert "skipped broken.png" in caplog.text
    assert same_weights(first.checkpoint, second.checkpoint)


def test_auto_packs_the_data_when_memory_is_short(models, dataset, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(training.encoded_data, "available_memory", lambda: 4 * 7 * 128 * 4 * 4)  # about the set's own size
    out = tmp_path / "run"
    run(models, dataset, out, "--max-steps", 1, "--data-workers", 0, "--buckets", BUCKETS, "--sample-every", 1, "--sample-steps", 2)
    assert "data: packed into shards on disk" in caplog.text
    assert list((out / "cache" / "packed").glob("*/index.json"))
    # The grid: 4 prompts at 32x32 (2x2), and under it prompt 0 at the widest (64x32) and tallest (32x64) bucket.
    assert Image.open(out / "samples" / "step-000001.png").size == (96, 128)
    assert "wide 64x32 (seed 0)" in (out / "samples" / "prompts.txt").read_text(encoding="utf-8")
    monkeypatch.setattr(training.encoded_data, "available_memory", lambda: 1 << 40)
    run(models, dataset, tmp_path / "again", "--max-steps", 1)
    assert "data: held in memory" in caplog.text


def test_a_restart_neither_hashes_nor_opens_unchanged_images(models, tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    touched = []

    def watch(name, function):
        def watched(path, *args):
            if path.suffix == ".png":
                touched.append((name, path.name))
            return function(path, *args)
        return watched

    monkeypatch.setattr(training.cache, "file_sha256", watch("hash", training.cache.file_sha256))
    monkeypatch.setattr(training.encoded_data, "image_size", watch("size", training.encoded_data.image_size))
    options = ["--max-steps", 1, "--buckets", BUCKETS]
    run(models, data, tmp_path / "a", *options, cache=tmp_path / "cache")
    assert [name for name, _ in touched].count("hash") == 8 and [name for name, _ in touched].count("size") == 8
    touched.clear()
    run(models, data, tmp_path / "b", *options, cache=tmp_path / "cache")
    assert touched == [("size", "broken.png")]  # only the unreadable header is tried again
    (data / "img3.png").write_bytes((data / "img0.png").read_bytes())  # a changed file is hashed and measured again
    touched.clear()
    run(models, data, tmp_path / "c", *options, cache=tmp_path / "cache")
    assert sorted(touched) == [("hash", "img3.png"), ("size", "broken.png"), ("size", "img3.png")]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_to_the_process_group_still_saves_with_workers_reading(models, dataset, tmp_path, stop_signal):
    """A terminal's Ctrl-C reaches the DataLoader workers too; the run must still finish its step and save."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training", *argv(models, dataset, out, "--data-loading", "shards", "--data-workers", 2,
                                                         "--max-steps", 100_000, "--save-every", 0)]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "step 3/" in line:
            os.killpg(process.pid, stop_signal)
            break
    output = "".join(lines) + process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "continue with --resume" in output
    assert len(list((out / "states").glob("step-*"))) == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_row_stops_training_in_one_line(models, dataset, tmp_path, caplog, workers):
    cache = tmp_path / "cache"
    run(models, dataset, tmp_path / "a", "--data-loading", "shards", "--max-steps", 1, cache=cache)
    (shard,) = (cache / "packed").glob("*/shard-*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last row's prompt
    shard.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR)
    code = main(argv(models, dataset, tmp_path / "b", "--data-loading", "shards", "--data-workers", workers, "--max-steps", 20,
                     cache=cache))
    assert code == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "does not match its checksum" in message and "delete the folder" in message
    assert "\n" not in message and "Traceback" not in caplog.text


def test_a_shard_copied_from_another_data_set_is_refused_in_one_line(models, tmp_path, caplog):
    """Same bucket, row count, shapes and valid row checksums: the shard's recorded source tells it apart."""
    ours = write_dataset(tmp_path / "ours")
    theirs = shutil.copytree(ours, tmp_path / "theirs")
    for picture in theirs.glob("img*.png"):
        Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(picture)
    cache = tmp_path / "cache"
    for data in (ours, theirs):
        run(models, data, tmp_path / f"run-{data.name}", "--data-loading", "shards", "--max-steps", 1, cache=cache)
    packs = sorted((cache / "packed").iterdir(), key=lambda p: p.stat().st_mtime)
    shard = next(packs[0].glob("shard-*.safetensors"))
    shutil.copy(packs[1] / shard.name, shard)
    caplog.set_level(logging.ERROR)
    assert main(argv(models, ours, tmp_path / "again", "--data-loading", "shards", "--max-steps", 1, cache=cache)) == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(f"{shard}: holds other samples than this data set's") and "\n" not in message
    assert f"delete the folder {packs[0]} " in message


def test_a_pack_that_cannot_be_written_is_one_line(models, dataset, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "packed").write_text("a file where the packs' folder goes", encoding="utf-8")
    caplog.set_level(logging.ERROR)
    code = main(argv(models, dataset, tmp_path / "run", "--data-loading", "shards", cache=cache))
    assert code == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "cannot write to the encoding cache" in message and "--cache-dir" in message and "\n" not in message


def test_a_failing_reader_ends_the_run_instead_of_hanging_on_its_workers(models, dataset, tmp_path):
    """The workers ignore SIGTERM, so the trainer must end them itself; here a bug inside the loader (not a
    damaged shard) propagates, and the process must still exit with the traceback, not wait for them."""
    args = [str(a) for a in argv(models, dataset, tmp_path / "run", "--data-loading", "shards", "--data-workers", 2)]
    child = ("import sys, training.shards\n"
             "def broken(self, samples):\n    raise RuntimeError('a bug in the reader')\n"
             "training.shards.ShardReader.read = broken\n"
             f"from training.train import main\nsys.exit(main({args!r}))\n")
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "RuntimeError: a bug in the reader" in result.stderr
