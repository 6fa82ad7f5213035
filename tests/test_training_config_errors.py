"""Training options that used to pass the config checks and then fail deep inside torch or numpy
(a traceback) or train silently on nonsense (``--lr inf`` wrote NaN weights): each is now one
line naming the option, the value and what is allowed, before any file is read or written."""

import pytest

from aaa_core.errors import InputError
from training.config import parse_config
from training.export import main as export_main
from training.train import main as train_main


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "lr nan: must be a finite number"),
    (["--lr", "inf"], "lr inf: must be a finite number"),
    (["--max-epochs", "nan", "--max-steps", "0"], "max_epochs nan: must be a finite number"),
    (["--sample-cfg", "nan"], "sample_cfg nan: must be a finite number"),
    (["--lr", "-1"], "lr -1.0 must not be negative"),
    (["--min-lr", "1"], "min_lr 1.0 must be between 0 and lr 0.0002"),
    (["--caption-dropout", "1.5"], "caption_dropout 1.5 must be between 0 and 1"),
    (["--adam-eps", "0"], "adam_eps 0.0 must be greater than 0"),
    (["--adam-beta1", "1.5"], "adam_beta1 1.5 and adam_beta2 0.999 must be in [0, 1)"),
    (["--max-grad-norm", "-1"], "weight_decay, max_grad_norm and peak_flops must not be negative"),
    (["--num-heads", "-1"], "dim 0, depth 0, num_heads -1: sizes must not be negative"),  # 0 takes the --model preset's
    (["--depth", "-2"], "dim 0, depth -2, num_heads 0: sizes must not be negative"),
    (["--seed", "-1"], "seed -1 must be between 0 and 4294967295"),  # numpy refused it mid-set-up
    (["--seed", str(2**40)], f"seed {2**40} must be between 0 and 4294967295"),
    (["--sample-seed", "-5"], "sample_seed -5 must be between 0 and 18446744073709551615"),
    (["--resolution", "99984"], "resolution 99984 is above the maximum of 8192"),
    (["--buckets", "512x250,256x256"], "buckets '512x250,256x256': '512x250' has a side of 250; use 'square', 'aspect' or"),
    (["--sample-steps", "100000"], "sample_steps 100000 is above the maximum of 10000"),
    (["--data-workers", "-1"], "data_workers -1 must be between 0 and 64"),
    (["--data-workers", "1000"], "data_workers 1000 must be between 0 and 64"),
    (["--num-validation-prompts", "0"], "num_validation_prompts 0 must be at least 1 when samples are drawn"),
    (["--validation-prompts", "a\x00b"], "validation_prompts[0]: character 1 is a NUL character"),
    (["--negative-prompt", "bad \udcff byte"], "negative_prompt: character 4 is not valid text (byte 0xff)"),
])
def test_bad_option_is_one_line_naming_it(flags, message, tmp_path):
    with pytest.raises(InputError) as caught:
        parse_config(["--data", "x", "--output-dir", str(tmp_path / "run"), *flags])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_the_same_values_from_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('data = "x"\nlr = nan\n', encoding="utf-8")
    with pytest.raises(InputError, match="lr nan: must be a finite number"):
        parse_config(["--config", str(config)])
    assert parse_config(["--config", str(config), "--lr", "1e-4", "--num-validation-prompts", "0", "--sample-every", "0"]).lr == 1e-4


@pytest.mark.parametrize("entry, argv, fragment", [
    (train_main, ["--batch-size", "abc"], "error: argument --batch-size: invalid int value: 'abc' (see python -m training --help)"),
    (export_main, ["state", "out.safetensors", "--weights", "both"], "error: argument --weights: invalid choice: 'both'"),
])
def test_usage_mistakes_are_one_line(entry, argv, fragment, capsys):
    with pytest.raises(SystemExit) as caught:
        entry(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and fragment in err, err  # not the whole usage text


def test_a_model_too_large_for_memory_is_refused_with_the_figure_before_anything_is_written(tmp_path, caplog):
    out = tmp_path / "run"
    assert train_main(["--data", str(tmp_path / "data"), "--output-dir", str(out), "--dim", "1048576", "--depth", "2",
                       "--device", "cpu", "--precision", "fp32"]) == 1
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    # 2 blocks 1048576 wide: 27.5e12 parameters, 16 bytes each in fp32 (weights, gradients, 2 AdamW moments) + 4 of EMA.
    assert "dim 1048576, depth 2: the model has 27,488,627,458,176 parameters" in message, message
    assert "AdamW state and EMA take 549,772.5 GB, more than the" in message
    assert "choose a smaller --model, --dim or --depth" in message and "\n" not in message
    assert not out.exists()


def test_training_bytes_count_the_real_parameters(monkeypatch):
    import torch

    from aaa_core.dit import AAADiT, AAADiTConfig
    from training import memory

    config = AAADiTConfig(dim=64, depth=2, num_heads=4, text_dim=32)
    parameters = sum(p.numel() for p in AAADiT(config).parameters())
    assert memory.training_bytes(config, torch.float32, ema=True) == (parameters, parameters * 20)
    assert memory.training_bytes(config, torch.bfloat16, ema=False) == (parameters, parameters * 8)
    monkeypatch.setattr(memory, "available_memory", lambda: parameters * 20)
    memory.check_model_fits(config, torch.float32, True, torch.device("cpu"))  # exactly fits
    deeper = AAADiTConfig(dim=64, depth=3, num_heads=4, text_dim=32)
    with pytest.raises(InputError, match="more than the"):
        memory.check_model_fits(deeper, torch.float32, True, torch.device("cpu"))
    memory.check_model_fits(deeper, torch.float32, True, torch.device("cpu"), shards=2)  # FSDP: each process holds half
