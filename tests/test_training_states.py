"""Training states never unpickle anything, and an output folder holds one run (CPU, ~25 s on two cores).

Covers: pickle payloads planted under every file name a resume reads (never run, one-line error
naming the file), states of the older pickled format, a fresh run refused in a used folder,
``--overwrite``, pruning and ``--resume`` limited to the folder's own run, stale temp files swept.
"""

import json
import logging
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from aaa_core.checkpoint import read_safetensors, save_safetensors
from aaa_core.outputs import atomic_output, temp_path_for
from aaa_core.dit import load_dit
from aaa_core.errors import InputError
from test_training import argv, dataset, models, run  # noqa: F401 (fixtures)
from training import export
from training.config import parse_config
from training.state_files import load_tree, save_tree
from training.train import main

STATE_FILES = ["progress.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors",
               "lr_scheduler.safetensors", "rng-rank0.safetensors"]
OLD_FILES = ["optimizer.pt", "lr_scheduler.pt", "rng-rank0.pt"]  # what the pickled format 1 held


class Payload:
    """Unpickling this creates a marker file: what a hostile state file would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def saved(models, dataset, tmp_path_factory):  # noqa: F811
    """A finished 2-step run (state step-000002) and its cache, to copy from."""
    root = tmp_path_factory.mktemp("runs")
    run(models, dataset, root / "saved", "--max-steps", 2, "--ema-decay", 0.9, cache=root / "cache")
    return root / "saved", root / "cache"


def copy_run(saved, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(saved[0], out)
    return out


def error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def resume(models, dataset, out, cache, *extra):  # noqa: F811
    return main(argv(models, dataset, out, "--resume", *extra, cache=cache))


def test_state_tree_round_trip_keeps_keys_types_and_bits(tmp_path):
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}}, "groups": [{"betas": (0.9, 0.999),
            "lr": 1 / 3, "fused": None, "name": "x", "nan": math.nan}], "empty": {}}
    save_tree(tree, tmp_path / "t.safetensors")
    back = load_tree(tmp_path / "t.safetensors")
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["m"], tree["state"][0]["m"])
    group = back["groups"][0]
    assert group["betas"] == [0.9, 0.999] and group["lr"] == 1 / 3 and group["fused"] is None and math.isnan(group["nan"])
    assert back["empty"] == {}


@pytest.mark.parametrize("name", STATE_FILES)
def test_pickle_payload_in_a_state_never_runs(models, dataset, saved, tmp_path, caplog, name):  # noqa: F811
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save(Payload(marker), payload)
    torch.load(payload, weights_only=False)  # the payload is real: unpickled, it runs
    assert marker.exists()
    marker.unlink()

    out = copy_run(saved, tmp_path)
    state = out / "states" / "step-000002"
    shutil.copy(payload, state / name)
    assert resume(models, dataset, out, saved[1], "--max-steps", 3) == 1
    assert not marker.exists()
    [message] = error_lines(caplog)
    assert str(state / name) in message and "\n" not in message
    assert sorted(p.name for p in (out / "states").iterdir()) == ["step-000002"]  # nothing new written


def test_state_of_the_older_pickled_format_is_refused_but_exportable(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    marker = tmp_path / "payload-ran"
    out = copy_run(saved, tmp_path)
    (out / "run.json").unlink()  # the older trainer wrote none
    state = out / "states" / "step-000002"
    progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
    del progress["state_format"], progress["run_id"]
    (state / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    for name in ("optimizer.safetensors", "lr_scheduler.safetensors", "rng-rank0.safetensors"):
        (state / name).unlink()
    for name in OLD_FILES:
        (state / name).write_bytes(pickle.dumps(Payload(marker)))

    for how in ([], [state]):  # --resume and --resume STATE
        caplog.clear()
        assert main(argv(models, dataset, out, "--resume", *how, "--max-steps", 3, cache=saved[1])) == 1
        [message] = error_lines(caplog)
        assert f"state {state} was written by an older version of the trainer" in message
        assert "--overwrite" in message and "python -m training.export" in message
    assert not marker.exists()

    # The way out the message gives: its weights still export (only safetensors and JSON are read).
    assert export.main([str(state), str(tmp_path / "raw.safetensors"), "--weights", "raw"]) == 0
    assert load_dit(tmp_path / "raw.safetensors").config.dim == 64
    assert not marker.exists()


def test_fresh_run_in_a_used_folder_is_refused_and_overwrite_replaces_it(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    out = copy_run(saved, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(argv(models, dataset, out, "--max-steps", 3, cache=saved[1])) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{out}: already holds 2 saved states or checkpoints of another run")
    assert all(way in message for way in ("--resume", "--output-dir", "--overwrite"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not a byte changed

    old_run = json.loads((out / "run.json").read_text(encoding="utf-8"))["run_id"]
    summary = run(models, dataset, out, "--overwrite", "--max-steps", 3, "--save-every", 1, cache=saved[1])
    new_run = json.loads((out / "run.json").read_text(encoding="utf-8"))["run_id"]
    assert summary.step == 3 and new_run != old_run
    assert sorted(p.name for p in (out / "states").iterdir()) == ["step-000002", "step-000003"]  # keep_states 2
    for state in (out / "states").iterdir():
        assert json.loads((state / "progress.json").read_text(encoding="utf-8"))["run_id"] == new_run
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"run-step-00000{i}.safetensors" for i in (1, 2, 3)]
    assert all(read_safetensors(p)[1]["aaa_run_id"] == new_run for p in checkpoints)
    assert "overwrite" not in (out / "config.toml").read_text(encoding="utf-8")  # re-running it never deletes
    with pytest.raises(InputError, match="--overwrite deletes the states --resume would continue from"):
        parse_config(argv(models, dataset, out, "--overwrite", "--resume"))


def test_resume_continues_this_folders_run_and_sweeps_stale_temp_files(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    out = copy_run(saved, tmp_path)
    states = out / "states"
    foreign = states / "step-000010"  # a newer state of another run, e.g. copied in by hand
    shutil.copytree(states / "step-000002", foreign)
    progress = json.loads((foreign / "progress.json").read_text(encoding="utf-8"))
    (foreign / "progress.json").write_text(json.dumps({**progress, "run_id": "another-run", "step": 10}), encoding="utf-8")
    # What a kill -9 during saves leaves: a half-built state folder and atomic writes never renamed.
    half_built = temp_path_for(states / "step-000003", shared=True)
    half_built.mkdir()
    (half_built / "model.safetensors").write_bytes(b"half")
    killed = [atomic_output(out / "checkpoints" / "run-step-000003.safetensors"), atomic_output(out / "config.toml")]
    temps = [writer.__enter__() for writer in killed]  # entered, never finished: their temp names stay
    for tmp in temps:
        tmp.write_bytes(b"partial")

    assert resume(models, dataset, out, saved[1], "--max-steps", 4, "--save-every", 1, "--keep-states", 1) == 0
    assert f"resumed from {states / 'step-000002'} at step 2" in caplog.text
    assert sorted(p.name for p in states.iterdir()) == ["step-000004", "step-000010"]  # the other run's is untouched
    assert json.loads((foreign / "progress.json").read_text(encoding="utf-8"))["step"] == 10
    assert not any(tmp.exists() for tmp in temps) and not half_built.exists()
    assert f"deleted {temps[0].parent} (left by an interrupted save)" in caplog.text  # the temp's private folder
    del killed


def test_valid_files_that_do_not_fit_the_run_are_named(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    """Readable state files whose content does not fit (a moment of the wrong shape, a missing tensor, bad sizes)."""
    out = copy_run(saved, tmp_path)
    state = out / "states" / "step-000002"
    optimizer = load_tree(state / "optimizer.safetensors")
    optimizer["state"][0]["exp_avg"] = torch.zeros(3, 5)
    save_tree(optimizer, state / "optimizer.safetensors")
    assert resume(models, dataset, out, saved[1], "--max-steps", 3) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{state / 'optimizer.safetensors'}: exp_avg has shape (3, 5) for a parameter of shape")

    caplog.clear()
    shutil.copy(saved[0] / "states" / "step-000002" / "optimizer.safetensors", state)
    save_tree({"torch": torch.zeros(3, dtype=torch.uint8)}, state / "rng-rank0.safetensors")  # a tree, not RNG states
    assert resume(models, dataset, out, saved[1], "--max-steps", 3) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{state / 'rng-rank0.safetensors'}: does not hold RNG states this run can use ('python')")

    caplog.clear()
    weights, _ = read_safetensors(state / "model.safetensors")
    save_safetensors(dict(list(weights.items())[1:]), state / "model.safetensors")  # one tensor short
    assert resume(models, dataset, out, saved[1], "--max-steps", 3) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{state / 'model.safetensors'}: keys do not match the model: 1 missing")

    caplog.clear()
    progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
    (state / "progress.json").write_text(json.dumps({**progress, "model_config": "[64, 2]"}), encoding="utf-8")
    assert resume(models, dataset, out, saved[1], "--max-steps", 3) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{state / 'progress.json'}: no usable model_config (TypeError")


def test_a_save_never_replaces_another_runs_state(models, dataset, saved, tmp_path, caplog):  # noqa: F811
    out = copy_run(saved, tmp_path)
    foreign = out / "states" / "step-000003"
    shutil.copytree(out / "states" / "step-000002", foreign)
    progress = json.loads((foreign / "progress.json").read_text(encoding="utf-8"))
    (foreign / "progress.json").write_text(json.dumps({**progress, "run_id": "another-run", "step": 3}), encoding="utf-8")
    assert resume(models, dataset, out, saved[1], "--max-steps", 4, "--save-every", 1) == 1
    [message] = error_lines(caplog)
    assert message.startswith(f"{foreign}: belongs to another run; not replacing it")
    assert json.loads((foreign / "progress.json").read_text(encoding="utf-8"))["run_id"] == "another-run"


@pytest.mark.parametrize("blocker", ["out", "parent", "states", "config.toml"])
def test_an_output_folder_the_run_cannot_write_is_refused_up_front(models, dataset, saved, tmp_path, caplog, blocker):  # noqa: F811
    out = tmp_path / "run"
    if blocker == "out":
        out.write_text("a file where the run folder should be", encoding="utf-8")
        expected = f"{out}: cannot be the output folder (a file has that name)"
    elif blocker == "parent":
        (tmp_path / "file").write_text("a file where a folder of the path should be", encoding="utf-8")
        out = tmp_path / "file" / "run"
        expected = f"{out}: cannot be the output folder (a part of the path is a file, not a folder)"
    elif blocker == "states":
        out.mkdir()
        (out / blocker).write_text("a file where a folder belongs", encoding="utf-8")
        expected = f"{out / blocker}: the trainer writes a folder here"
    else:
        (out / blocker).mkdir(parents=True)
        expected = f"{out / blocker}: the trainer writes a file here"
    assert main(argv(models, dataset, out, "--max-steps", 1, cache=saved[1])) == 1
    [message] = error_lines(caplog)
    assert message.startswith(expected)
    assert not (out.is_dir() and (out / "run.json").exists())
