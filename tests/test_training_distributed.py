"""Two CPU processes over gloo: DDP through the README's `accelerate launch`, and FSDP2-sharded weights.

Each trains 4 steps straight, and 2 steps then ``--resume`` to 4, on aspect buckets read from the
packed shards, and the two must end bit for bit alike: checkpoint, raw and EMA weights, AdamW moments, losses. accelerate does not shard on
CPU processes (``--use_fsdp`` stays DDP there), so the FSDP run shards with torch's own FSDP2 in
``fsdp_child.py``, as accelerate's FSDP2 ``prepare`` does on GPUs; all the trainer's code after
``prepare`` runs as it does under accelerate's FSDP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from aaa_core.checkpoint import read_safetensors
from aaa_core.dit import AAADiT, load_dit
from aaa_core.errors import InputError
from test_training import REPO, argv, dataset, models  # noqa: F401  (pytest fixtures)
from training.distributed import check_setup
from training.processes import Processes
from training.run_folder import claim_output_dir
from training.state_files import load_tree

# Gradient accumulation, clipping and the EMA all take part; float32 so both runs compute alike. The data:
# three aspect buckets, packed into shards (each process writes its share) and read by a worker per process.
OPTIONS = ["--batch-size", 2, "--grad-accum", 2, "--ema-decay", 0.9, "--max-grad-norm", 0.5, "--precision", "fp32",
           "--save-every", 2, "--device", "cpu", "--buckets", "32x32,64x32,32x64", "--data-loading", "shards",
           "--data-workers", 1, "--validation-split", 3, "--validate-every", 2]
STATE_FILES = ("model.safetensors", "ema.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def accelerate_launch(models, dataset, out: Path, *extra) -> subprocess.CompletedProcess:
    """The README's command: `accelerate launch --multi_gpu --num_processes 2 -m training ... --device cpu`."""
    return launch([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),  # the default 29500 collides with any other launch on the machine
        "-m", "training", *argv(models, dataset, out, *OPTIONS, *extra, cache=out.parent / "cache"),
    ])


def assert_same_final_state(straight: Path, split: Path) -> None:
    """Both folders end at step 4 with bit-identical checkpoints, weights, EMA and AdamW moments."""
    checkpoints = [folder / "checkpoints" / f"{folder.name}-step-000004.safetensors" for folder in (straight, split)]
    states = [folder / "states" / "step-000004" for folder in (straight, split)]
    pairs = [(read_safetensors(a)[0], read_safetensors(b)[0]) for a, b in
             [checkpoints] + [(states[0] / name, states[1] / name) for name in STATE_FILES]]
    for a, b in pairs:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moments = [load_tree(state / "optimizer.safetensors")["state"] for state in states]
    assert moments[0].keys() == moments[1].keys()
    assert all(torch.equal(moments[0][i][key], moments[1][i][key]) for i in moments[0] for key in ("exp_avg", "exp_avg_sq"))
    model = load_dit(checkpoints[1])  # strict: exactly AAADiT.state_dict()'s keys and full shapes
    expected = AAADiT(model.config).state_dict()
    weights, _ = read_safetensors(checkpoints[1])
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in expected.items()}
    for state in states:
        assert (state / "rng-rank0.safetensors").is_file() and (state / "rng-rank1.safetensors").is_file()


@pytest.fixture(scope="module")
def ddp_runs(models, dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    straight = accelerate_launch(models, dataset, root / "straight", "--max-steps", 4)
    accelerate_launch(models, dataset, root / "split", "--max-steps", 2)
    resumed = accelerate_launch(models, dataset, root / "split", "--max-steps", 4, "--resume")
    return root, straight, resumed


def test_ddp_two_processes_resume_bit_exactly(ddp_runs):
    root, straight, resumed = ddp_runs
    assert "8 samples per step (2 x 2 accumulation x 2 processes)" in straight.stderr
    assert "(32x32: 3, 64x32: 1, 32x64: 1)" in straight.stderr  # 2 of the 7 held out for validation and "read from 3 shard(s)" in straight.stderr
    assert "resumed from" in resumed.stderr and "split/states/step-000002 at step 2" in resumed.stderr
    assert_same_final_state(root / "straight", root / "split")
    # Only the main process writes the shared files; the split folder's first launch kept one state of each step.
    assert sorted(p.name for p in (root / "split" / "states").iterdir()) == ["step-000002", "step-000004"]
    assert [line.split("loss ")[1][:6] for line in straight.stderr.splitlines() if "step 4/4" in line] == \
           [line.split("loss ")[1][:6] for line in resumed.stderr.splitlines() if "step 4/4" in line]
    assert validation_lines(straight.stderr, 4) == validation_lines(resumed.stderr, 4)  # each process a share, summed


def validation_lines(log: str, step: int) -> list[str]:
    """The numbers of step ``step``'s validation lines (without their seconds)."""
    return [line.rsplit(" | ", 1)[0] for line in log.splitlines() if f"step {step} | validation loss on 2 held-out images" in line]


def test_fsdp_sharded_two_processes_resume_bit_exactly_and_match_ddp(models, dataset, ddp_runs, tmp_path):
    root = tmp_path
    runs = [argv(models, dataset, root / name, *OPTIONS, *extra, cache=ddp_runs[0] / "cache")
            for name, extra in (("straight", ["--max-steps", 4]), ("split", ["--max-steps", 2]),
                                ("split", ["--max-steps", 4, "--resume", "--sample-every", 4]))]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "fsdp_child.py")]
    for i, run in enumerate(runs):
        command += (["--then"] if i else []) + run
    result = launch(command)
    held = [line for line in result.stderr.splitlines() if "parameter elements" in line]
    assert len(held) == 6  # 2 processes x 3 runs, each holding a part
    for line in held:
        part, total = (int(n) for n in line.split("holds ")[1].split(" parameter")[0].split(" of "))
        assert 0 < part < total
    assert_same_final_state(root / "straight", root / "split")
    assert (root / "split" / "samples" / "step-000004.png").is_file()  # sampled from the EMA gathered to the main process
    # Sharding changes where the numbers live, not the training: the FSDP run ends where DDP ends.
    fsdp, _ = read_safetensors(root / "straight" / "states" / "step-000004" / "model.safetensors")
    ddp, _ = read_safetensors(ddp_runs[0] / "straight" / "states" / "step-000004" / "model.safetensors")
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < 1e-5
    # Validation under FSDP: every process takes part in each forward pass, the EMA is swapped into the shards.
    straight_and_resumed = validation_lines(result.stderr, 4)
    assert len(straight_and_resumed) == 2 and straight_and_resumed[0] == straight_and_resumed[1]
    ema_fsdp, ema_ddp = (float(lines[0].split("| ema ")[1].split()[0])
                         for lines in (straight_and_resumed, validation_lines(ddp_runs[1].stderr, 4)))
    assert abs(ema_fsdp - ema_ddp) < 1e-3


def fake_accelerator(distributed_type: DistributedType, fsdp_version: int = 2) -> SimpleNamespace:
    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(fsdp_plugin=plugin),
                           num_processes=2, device=torch.device("cpu"), is_main_process=True)


def test_fsdp1_and_fsdp_lora_are_refused_and_cpu_fsdp_is_said_to_be_ddp(monkeypatch, caplog):
    with pytest.raises(InputError, match=r"^FSDP version 1 is not supported: set fsdp_version: 2"):
        check_setup(fake_accelerator(DistributedType.FSDP, fsdp_version=1), lora=False)
    with pytest.raises(InputError, match=r"^--lora-rank with FSDP: .* launch it without FSDP"):
        check_setup(fake_accelerator(DistributedType.FSDP), lora=True)
    check_setup(fake_accelerator(DistributedType.FSDP), lora=False)
    check_setup(fake_accelerator(DistributedType.MULTI_CPU), lora=True)
    assert not caplog.records
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what --use_fsdp / an FSDP config sets
    check_setup(fake_accelerator(DistributedType.MULTI_CPU), lora=False)
    assert [r.getMessage() for r in caplog.records] == [
        "FSDP was asked for, but accelerate runs these cpu processes as MULTI_CPU without sharding: every process holds the whole model"]


def test_an_output_dir_that_another_machine_does_not_share_is_named(tmp_path):
    """A process other than the main one that does not see run.json (its machine's own disk) stops with one line."""
    with pytest.raises(InputError, match=r"does not see the run.json that the main process wrote there; with several "
                                         r"machines, --output-dir must be on a disk all of them share$"):
        claim_output_dir(tmp_path / "local", None, overwrite=False, processes=Processes(rank=1, world_size=2))
    assert claim_output_dir(tmp_path / "shared", None, overwrite=False, processes=Processes())  # the main process's own id
