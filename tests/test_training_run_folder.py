"""One run per output folder, and a folder that any stop leaves resumable (CPU, ~20 s on two cores).

Covers: a second trainer refused while a run holds the folder's lock (nothing of the first run
changes), the lock of a kill -9'd trainer taken over, exports into a running run's states/
refused, the folders a kill -9 leaves between a state and its checkpoint resumed bit for bit,
SIGTERM, ``--overwrite`` limited to a run's own files, config.toml recording the sizes that ran.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

import training.train
from aaa_core.checkpoint import read_safetensors
from aaa_core.outputs import temp_path_for
from test_training import REPO, argv, dataset, models, run, run_interrupted  # noqa: F401 (fixtures)
from tiny_models import TINY_DIT, save_tiny_dit
from test_training_states import copy_run, error_lines, saved  # noqa: F401 (fixtures)
from training import export
from training.config import parse_config
from training.state_files import load_tree
from training.train import main

SAVED = ["--ema-decay", 0.9]  # the options of the `saved` run besides --max-steps 2
STATE_FILES = ("model.safetensors", "ema.safetensors")


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_state(a, b):
    """Two states (or two checkpoints' folders) hold bit-identical weights, EMA and AdamW moments."""
    for name in STATE_FILES:
        x, y = read_safetensors(a / name)[0], read_safetensors(b / name)[0]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    moments = [load_tree(state / "optimizer.safetensors")["state"] for state in (a, b)]
    assert all(torch.equal(moments[0][i][k], moments[1][i][k]) for i in moments[0] for k in ("exp_avg", "exp_avg_sq"))


def assert_same_checkpoint(a, b, same_run=True):
    (x, x_meta), (y, y_meta) = read_safetensors(a), read_safetensors(b)
    if not same_run:
        del x_meta["aaa_run_id"], y_meta["aaa_run_id"]
    assert x_meta == y_meta and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_id(folder):
    return json.loads((folder / "run.json").read_text(encoding="utf-8"))["run_id"]


def test_a_second_trainer_is_refused_while_the_first_runs_and_changes_nothing(
        models, dataset, saved, tmp_path, monkeypatch, caplog):  # noqa: F811
    out = tmp_path / "run"
    seen = []
    real_loss = training.train.flow_matching_loss

    def second_trainers_during_step_2(*args, **kwargs):
        if len(seen) == 1:  # step 2: step 1's state and checkpoint are on disk
            before = snapshot(out)
            for extra in ([], ["--resume"], ["--overwrite"]):
                caplog.clear()
                assert main(argv(models, dataset, out, *extra, "--max-steps", 1, cache=saved[1])) == 1
                assert error_lines(caplog) == [
                    f"{out}: another trainer is running in this folder (process {os.getpid()} holds run.lock); "
                    "wait for it to end, or start this run in another --output-dir"]
            target = out / "states" / "raw.safetensors"
            assert export.main([str(out / "states" / "step-000001"), str(target), "--weights", "raw"]) == 1
            assert f"{target}: is inside {out / 'states'}, where the run of process {os.getpid()}" in caplog.text
            after = snapshot(out)
            # One process runs both here, so the first run's train.log also records the refusals, after its own lines.
            assert after.pop(Path("train.log")).startswith(before.pop(Path("train.log")))
            assert after == before  # not a byte of the first run changed
        seen.append(1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.train, "flow_matching_loss", second_trainers_during_step_2)
    summary = run(models, dataset, out, "--max-steps", 3, "--save-every", 1, cache=saved[1])
    assert summary.step == 3 and len(seen) == 3
    assert sorted(p.name for p in (out / "states").iterdir()) == ["step-000002", "step-000003"]
    # Once the run has ended, the folder is free: the export goes through.
    assert export.main([str(summary.state), str(out / "states" / "raw.safetensors"), "--weights", "raw"]) == 0


def test_the_lock_of_a_killed_trainer_is_taken_over(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    out = copy_run(saved, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from training.run_lock import RunLock; "
         "lock = RunLock.try_acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(argv(models, dataset, out, "--resume", *SAVED, "--max-steps", 3, cache=saved[1])) == 1
        assert f"(process {holder.pid} holds run.lock)" in error_lines(caplog)[0]
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # what a killed run leaves: run.lock naming a process that is gone
        holder.wait()
    assert (out / "run.lock").read_text(encoding="ascii") == f"{holder.pid}\n"
    caplog.set_level(logging.INFO)
    assert main(argv(models, dataset, out, "--resume", *SAVED, "--max-steps", 3, cache=saved[1])) == 0
    assert f"taking over the lock of process {holder.pid}, which has ended" in caplog.text
    assert (out / "states" / "step-000003").is_dir()


def test_killed_between_a_state_and_its_checkpoint_resume_writes_the_checkpoint(models, dataset, saved, tmp_path):  # noqa: F811
    """The state is written first; a kill -9 before the checkpoint leaves the state alone."""
    out = copy_run(saved, tmp_path)
    (out / "checkpoints" / "saved-step-000002.safetensors").rename(out / "original.safetensors")
    assert main(argv(models, dataset, out, "--resume", *SAVED, "--max-steps", 2, cache=saved[1])) == 0
    assert_same_checkpoint(out / "checkpoints" / "run-step-000002.safetensors", out / "original.safetensors")


def test_killed_before_its_first_state_resume_starts_the_run_afresh_bit_for_bit(models, dataset, saved, tmp_path):  # noqa: F811
    """What a kill -9 between the first checkpoint and the first state left (the order of earlier versions)."""
    out = copy_run(saved, tmp_path)
    shutil.rmtree(out / "states" / "step-000002")
    half_built = temp_path_for(out / "states" / "step-000002", shared=True)
    half_built.mkdir()
    (half_built / "model.safetensors").write_bytes(b"half")
    before = run_id(out)
    summary = run(models, dataset, out, "--resume", *SAVED, "--max-steps", 2, cache=saved[1])
    assert run_id(out) == before and summary.step == 2 and not half_built.exists()
    assert_same_state(summary.state, saved[0] / "states" / "step-000002")
    assert_same_checkpoint(summary.checkpoint, saved[0] / "checkpoints" / "saved-step-000002.safetensors")


def test_sigterm_saves_a_state_that_resumes_bit_for_bit(models, dataset, saved, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "saved"  # the saved run's name, so the checkpoints compare by name
    stopped = run_interrupted(monkeypatch, models, dataset, out, *SAVED, "--max-steps", 2, cache=saved[1],
                              at_loss_call=1, signum=signal.SIGTERM)
    assert stopped.stopped and stopped.step == 1 and stopped.checkpoint.is_file() and stopped.state.is_dir()
    resumed = run(models, dataset, out, *SAVED, "--max-steps", 2, "--resume", cache=saved[1])
    assert_same_state(resumed.state, saved[0] / "states" / "step-000002")
    assert_same_checkpoint(resumed.checkpoint, saved[0] / "checkpoints" / "saved-step-000002.safetensors", same_run=False)


def test_overwrite_deletes_only_what_a_run_wrote(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    # The example: no run ever wrote into this folder, so --overwrite touches nothing in it.
    photos = tmp_path / "photos"
    (photos / "samples").mkdir(parents=True)
    (photos / "samples" / "photo.png").write_bytes(b"a user's photo")
    (photos / "config.toml").write_text('data = "mine"\n', encoding="utf-8")
    before = snapshot(photos)
    assert main(argv(models, dataset, photos, "--overwrite", "--max-steps", 1, cache=saved[1])) == 1
    assert error_lines(caplog) == [
        f"{photos}: --overwrite deletes only what the trainer wrote, but no run.json or training state says a trainer "
        "wrote samples, config.toml; move them away or pick another --output-dir"]
    assert snapshot(photos) == before

    # A run's folder: its files go, a user's files among them stay.
    out = copy_run(saved, tmp_path)
    (out / "samples").mkdir()
    for user_file in ("samples/photo.png", "checkpoints/mine.safetensors", "states/notes.txt", "notes.txt"):
        (out / user_file).write_bytes(b"a user's file")
    run(models, dataset, out, "--overwrite", "--max-steps", 1, cache=saved[1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["mine.safetensors", "run-step-000001.safetensors"]
    assert sorted(p.name for p in (out / "states").iterdir()) == ["notes.txt", "step-000001"]
    assert (out / "samples" / "photo.png").read_bytes() == (out / "notes.txt").read_bytes() == b"a user's file"


def recorded_sizes(folder):
    cfg = parse_config(["--config", str(folder / "config.toml")])
    return cfg.model, cfg.dim, cfg.depth, cfg.num_heads


def size_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--model" in r.getMessage()]


def test_config_toml_records_the_sizes_that_ran(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    def as_aaa_s(args):  # the tiny run's options, with --model AAA-S (dim 512) instead of its sizes
        tiny = {"--dim", "--depth", "--num-heads"}
        return [a for i, a in enumerate(args) if a not in tiny and args[i - 1] not in tiny] + ["--model", "AAA-S"]

    # The first example: --model AAA-S --init-from a 96-wide file.
    wide = save_tiny_dit(tmp_path / "wide.safetensors", dataclasses.replace(TINY_DIT, dim=96, num_heads=6))
    out = tmp_path / "fine-tune"
    assert main(as_aaa_s(argv(models, dataset, out, "--init-from", wide, "--max-steps", 1, cache=saved[1]))) == 0
    assert recorded_sizes(out) == ("AAA-S", 96, 2, 6)
    assert size_warnings(caplog) == [
        f"--model AAA-S, --dim, --depth and --num-heads give dim 512, depth 8, 16 heads, but {wide} holds dim 96, depth 2, "
        "6 heads: the run trains at the file's sizes, and config.toml records them"]

    # The second: resuming a 64-wide run with --model AAA-S.
    caplog.clear()
    out = copy_run(saved, tmp_path)
    assert main(as_aaa_s(argv(models, dataset, out, "--resume", *SAVED, "--max-steps", 2, cache=saved[1]))) == 0
    assert recorded_sizes(out) == ("AAA-S", 64, 2, 4)
    [warning] = size_warnings(caplog)
    assert f"but {out / 'states' / 'step-000002'} holds dim 64, depth 2, 4 heads" in warning
    caplog.clear()
    assert main(["--config", str(out / "config.toml"), "--resume", "--max-steps", "2"]) == 0  # what it records runs as it is
    assert not size_warnings(caplog)
