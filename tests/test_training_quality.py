"""What a researcher uses to judge a run: learning-rate schedules, caption dropout, held-out validation, progress.

Each feature resumes bit for bit (interrupt with a real Ctrl-C, ``--resume``, compare with an
uninterrupted run), on the tiny models and data set of ``test_training.py``.
"""

import math

import pytest
import torch

from aaa_core.checkpoint import read_safetensors
from test_training import dataset, models, run, run_interrupted  # noqa: F401  (fixtures)
from training.lr_schedule import LrSchedule
from training.state_files import load_tree


def assert_resume_is_bit_exact(models, dataset, tmp_path, monkeypatch, *options):
    """Runs 6 steps at once and as 3 + Ctrl-C + resume; returns both summaries after comparing weights, EMA and lr."""
    options = ["--max-steps", 6, "--batch-size", 2, "--ema-decay", 0.9, "--warmup-steps", 2, *options]
    cache = tmp_path / "cache"
    full = run(models, dataset, tmp_path / "full", *options, cache=cache)
    interrupted = run_interrupted(monkeypatch, models, dataset, tmp_path / "split", *options, cache=cache, at_loss_call=3)
    assert interrupted.stopped and interrupted.step == 3
    resumed = run(models, dataset, tmp_path / "split", *options, "--resume", cache=cache)
    for name in ("model.safetensors", "ema.safetensors"):
        a, _ = read_safetensors(full.state / name)
        b, _ = read_safetensors(resumed.state / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lr_full = load_tree(full.state / "lr_scheduler.safetensors")["_last_lr"]
    assert lr_full == load_tree(resumed.state / "lr_scheduler.safetensors")["_last_lr"]
    assert resumed.losses[-1] == full.losses[-1]
    return full, resumed


# --------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------


def test_schedules_warm_up_then_decay_to_the_floor():
    cosine = LrSchedule(1.0, "linear", 4, "cosine", 0.1, 104)
    assert [cosine.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine.factor(4) == 1.0 and cosine.factor(54) == pytest.approx(0.55) and cosine.factor(104) == pytest.approx(0.1)
    linear = LrSchedule(2.0, "constant", 2, "linear", 0.0, 12)
    assert [linear.factor(s) for s in (0, 1, 2, 7, 12, 50)] == pytest.approx([1 / 3, 1 / 3, 1.0, 0.5, 0.0, 0.0])
    constant = LrSchedule(2.0, "constant", 0, "constant", 0.0, 12)
    assert {constant.factor(s) for s in range(20)} == {1.0}
    assert "cosine decay to 1.00e-01 at step 104" in cosine.describe()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decaying_schedules_resume_bit_for_bit(models, dataset, tmp_path, monkeypatch, schedule):
    full, _ = assert_resume_is_bit_exact(models, dataset, tmp_path, monkeypatch, "--lr-schedule", schedule, "--min-lr", 1e-4)
    expected = LrSchedule(1e-3, "constant", 2, schedule, 1e-4, 6).factor(6) * 1e-3  # the rate after the last step
    assert load_tree(full.state / "lr_scheduler.safetensors")["_last_lr"] == [pytest.approx(expected, rel=1e-12)]
    assert math.isclose(expected, 1e-4)
