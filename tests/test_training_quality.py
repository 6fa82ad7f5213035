"""What a researcher uses to judge a run: learning-rate schedules, caption dropout, held-out validation, progress.

Each feature resumes bit for bit (interrupt with a real Ctrl-C, ``--resume``, compare with an
uninterrupted run), on the tiny models and data set of ``test_training.py``.
"""

import functools
import logging
import math

import pytest
import torch

import training.train
from aaa_core.checkpoint import read_safetensors
from aaa_core.errors import InputError
from aaa_core.text_encoder import load_text_encoder
from test_training import REPO, dataset, models, run, run_interrupted  # noqa: F401  (fixtures)
from training.config import parse_config
from training.caption_dropout import CaptionDropout
from training.pairs import Sample
from training.lr_schedule import LrSchedule
from training.progress import Heartbeat, Progress
from training.state_files import load_tree
from training.validation import TIMESTEP_GROUPS, hold_out


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


# --------------------------------------------------------------------------------------
# Caption dropout
# --------------------------------------------------------------------------------------


def test_caption_dropout_replaces_a_deterministic_share_of_rows_by_the_empty_prompt():
    text, empty = torch.randn(400, 3, 2), torch.full((3, 2), 7.0)
    dropout = CaptionDropout(0.25, empty, seed=5, rank=0)
    out = dropout(text, micro_step=11)
    dropped = (out == empty).flatten(1).all(1)
    assert torch.equal(out[~dropped], text[~dropped])  # the others are untouched
    assert 70 < dropped.sum() < 130  # about a quarter of 400
    assert torch.equal(dropout(text, 11), out)  # a pure function of (seed, micro-step, rank)
    assert not torch.equal(dropout(text, 12), out) and not torch.equal(CaptionDropout(0.25, empty, 5, 1)(text, 11), out)
    assert torch.equal(CaptionDropout(0.0, None, 5, 0)(text, 11), text)
    assert (CaptionDropout(1.0, empty, 5, 0)(text, 11) == empty).all()


def test_caption_dropout_trains_on_the_negative_prompt_and_resumes_bit_for_bit(models, dataset, tmp_path, monkeypatch):
    seen = []
    real_loss = training.train.flow_matching_loss
    monkeypatch.setattr(training.train, "flow_matching_loss", lambda *a, **k: seen.append(a[2]) or real_loss(*a, **k))
    full, _ = assert_resume_is_bit_exact(models, dataset, tmp_path, monkeypatch, "--caption-dropout", 0.5)
    encoder = load_text_encoder(models["text_encoder"], dtype=torch.float32)
    negative = encoder.encode([" "])[0]
    rows = torch.cat(seen[:6]).float()  # the uninterrupted run's batches
    dropped = torch.isclose(rows, negative, atol=2e-2).flatten(1).all(1)
    assert 0 < dropped.sum() < len(rows)


# --------------------------------------------------------------------------------------
# Held-out validation
# --------------------------------------------------------------------------------------


def test_held_out_images_are_chosen_by_name_and_stay_the_same_when_images_are_added(tmp_path):
    samples = [Sample(tmp_path / f"img{i}.png", f"caption {i}") for i in range(40)]
    train, held, _ = hold_out(samples, 0.25, "")
    assert len(held) == 10 and len(train) == 30 and not {s.image for s in held} & {s.image for s in train}
    more = samples + [Sample(tmp_path / f"new{i}.png", "new") for i in range(40)]
    _, held_more, _ = hold_out(more, 10, "")  # a count: the same ten wherever the new names fall
    assert {s.image for s in held_more if s.image.name.startswith("img")} < {s.image for s in held}
    assert hold_out(list(reversed(samples)), 0.25, "")[1] == list(reversed(held))  # the list order does not matter
    with pytest.raises(InputError, match="validation_split 40 holds out 40 of the 40 images"):
        hold_out(samples, 40, "")


def test_validation_loss_is_the_same_on_a_repeat_and_after_resume(models, dataset, tmp_path, monkeypatch):
    options = ["--validation-split", 2, "--validate-every", 3]
    full, resumed = assert_resume_is_bit_exact(models, dataset, tmp_path, monkeypatch, *options)
    repeat = run(models, dataset, tmp_path / "repeat", "--max-steps", 6, "--batch-size", 2, "--ema-decay", 0.9,
                 "--warmup-steps", 2, *options, cache=tmp_path / "cache")
    assert [step for step, _ in full.validation] == [3, 6] and resumed.validation[-1][0] == 6
    assert full.validation == repeat.validation  # equal numbers, not close ones
    assert resumed.validation[-1] == full.validation[-1]
    scalars = full.validation[-1][1]
    assert set(scalars) >= {"val/raw/loss", "val/ema/loss"} and len(scalars) == 2 * (1 + TIMESTEP_GROUPS)
    assert scalars["val/raw/loss"] != scalars["val/ema/loss"]  # the EMA really was evaluated, and put back (resume is exact)
    log = (tmp_path / "full" / "train.log").read_text()
    assert "held-out images | ema " in log and "data: 6 samples" in log  # 8 usable pairs less the 2 held out
    assert full.validation[0][1]["val/raw/loss"] > 0


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class FakeClock:
    """Each reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_heartbeat_logs_after_the_first_step_then_whenever_quiet_for_log_seconds():
    clock = FakeClock(0.0)
    beat = Heartbeat(30, first_step=100, total_steps=1100, clock=clock)
    assert beat.due()  # the first step is owed a line
    clock.now = 50.0
    assert beat.line(101, 0.5) == "step 101/1100 | 0.02 steps/s | ETA 13h52m | loss 0.5000 (this process, since the last line)"
    clock.now = 79.0
    assert not beat.due()
    clock.now = 80.0
    assert beat.due()
    beat.logged()  # a regular line counts too
    assert not beat.due()


def test_a_run_at_the_default_log_settings_says_where_it_is_within_30_seconds_of_its_first_step(
        models, dataset, tmp_path, monkeypatch, caplog):
    clock = FakeClock(12.0)  # every reading 12 s later: each step looks slow
    monkeypatch.setattr(training.train, "Heartbeat", functools.partial(Heartbeat, clock=clock))
    caplog.set_level(logging.INFO, logger="training")
    run(models, dataset, tmp_path / "run", "--log-every", 10, "--max-steps", 6)  # log_seconds stays at its default 30
    lines = [r.getMessage() for r in caplog.records if "| ETA " in r.getMessage()]
    assert lines[0].startswith("step 1/6 |")  # right after the first step, though log_every is 10
    assert len(lines) >= 2 and all(line.split("/")[0] != "step 6" for line in lines)  # and again after 30 s; 6 is a regular line


def test_long_passes_write_plain_lines_when_not_in_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="training")
    with Progress(10, "encoding images", "images", seconds=30, clock=FakeClock(10.0)) as bar:  # pytest's stderr is no terminal
        for _ in range(10):
            bar.update()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "encoding images: 10 images to do" and messages[-1].startswith("encoding images: 10 images in ")
    assert "encoding images: 3/10 images | ETA 1m10s" in messages
    assert len(messages) == 5  # start, at 3, 6 and 9 done (every 30 s), end


def test_the_quick_recipe_is_small_and_watches_itself_while_the_reference_recipe_stays_the_reference():
    quick = parse_config(["--config", str(REPO / "training" / "configs" / "quick.toml")])
    assert (quick.dim, quick.resolution, quick.batch_size) == (512, 128, 8)  # AAA-S
    assert quick.validation_split and quick.validate_every and quick.sample_every and quick.caption_dropout == 0.1
    pokemon = parse_config(["--config", str(REPO / "training" / "configs" / "pokemon.toml")])
    assert (pokemon.caption_dropout, pokemon.lr_schedule, pokemon.validation_split) == (0.0, "constant", 0.0)
