"""Bad model files give one-line errors naming the file, the tensor or key, and what was expected.

Every case is a real file: a tiny model from ``tiny_models`` with one tensor or one metadata value
changed, read through the same loaders the CLI and the nodes use.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aaa_core import checkpoint
from aaa_core.dit import CONFIG_METADATA_KEY, load_dit
from aaa_core.errors import ModelFileError
from aaa_core.vae import load_vae
from tiny_models import TINY_DIT, save_tiny_dit, save_tiny_text_encoder, save_tiny_vae
from unprivileged import run_unprivileged, shared_folder


def edited(path, tensors=None, metadata=None):
    """Rewrites a safetensors file in place with some tensors and metadata entries replaced."""
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = dict(handle.metadata() or {})
    save_file({**state, **(tensors or {})}, str(path), metadata={**meta, **(metadata or {})})
    return path


def error_of(load, path, named=None, **kwargs) -> str:
    """The one-line error ``load(path)`` raises; it must start with the file at fault (``named``, else ``path``)."""
    with pytest.raises(ModelFileError) as err:
        load(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{named or path}: "), message
    return message


@pytest.fixture
def dit_file(tmp_path):
    return save_tiny_dit(tmp_path / "dit.safetensors")


@pytest.fixture
def vae_file(tmp_path):
    return save_tiny_vae(tmp_path / "vae.safetensors")


# --------------------------------------------------------------------------------------
# Weights: non-finite values, integer tensors, BatchNorm variance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_dit_weight_is_named(dit_file, bad):
    weight = torch.zeros(TINY_DIT.dim, TINY_DIT.dim)
    weight[3, 5] = bad
    edited(dit_file, {"blocks.1.to_v.weight": weight})
    assert "tensor blocks.1.to_v.weight holds NaN or infinite values" in error_of(load_dit, dit_file)


def test_non_finite_vae_weight_is_named(vae_file):
    with safe_open(str(vae_file), framework="pt") as handle:
        weight = handle.get_tensor("decoder.conv_out.weight")
    weight.view(-1)[0] = float("nan")
    edited(vae_file, {"decoder.conv_out.weight": weight})
    assert "tensor decoder.conv_out.weight holds NaN or infinite values" in error_of(load_vae, vae_file)


def test_weight_that_overflows_the_chosen_dtype_says_which_dtype_to_use(dit_file):
    edited(dit_file, {"proj_out.bias": torch.full((128,), 1e6)})
    message = error_of(load_dit, dit_file, dtype=torch.float16)
    assert "tensor proj_out.bias overflows float16 (values up to 1e+06); load it in fp32 or bf16" in message
    assert load_dit(dit_file, dtype=torch.bfloat16).proj_out.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weight_is_refused(dit_file, dtype):
    edited(dit_file, {"proj_out.weight": torch.ones(128, TINY_DIT.dim, dtype=dtype)})
    expected = f"tensor proj_out.weight is {str(dtype)[6:]}, expected floating-point weights"
    assert expected in error_of(load_dit, dit_file)


def test_vae_batch_norm_variance_must_be_positive(vae_file):
    variance = torch.ones(128)
    variance[7], variance[9] = 0.0, -0.5
    edited(vae_file, {"bn.running_var": variance})
    assert "tensor bn.running_var has 2 of 128 values <= 0 (smallest -0.5)" in error_of(load_vae, vae_file)


# --------------------------------------------------------------------------------------
# DiT metadata
# --------------------------------------------------------------------------------------


def config_json(**changes) -> str:
    return json.dumps({**json.loads(TINY_DIT.to_json()), **changes})


@pytest.mark.parametrize(
    "stored, expected",
    [
        (config_json(num_heads=0), "metadata aaa_dit_config num_heads must be a positive integer, got 0"),
        (config_json(num_heads="4"), "metadata aaa_dit_config num_heads must be a positive integer, got '4'"),
        (config_json(num_heads=2.5), "num_heads must be a positive integer, got 2.5"),
        (config_json(num_heads=3), "dim 64 is not divisible by num_heads 3"),
        (config_json(dim=128), "metadata aaa_dit_config says dim 128, but the weights' shapes give 64"),
        (config_json(heads=4), "metadata aaa_dit_config has an unknown key 'heads'"),
        ("[4]", "metadata aaa_dit_config must be a JSON object, got list"),
        ('{"num_heads": 4', "metadata aaa_dit_config is not valid JSON"),
    ],
)
def test_bad_dit_metadata_is_named(dit_file, stored, expected):
    edited(dit_file, metadata={CONFIG_METADATA_KEY: stored})
    assert expected in error_of(load_dit, dit_file)


@pytest.mark.parametrize(
    "tensors, expected",
    [
        ({"image_embedder.0.weight": torch.zeros(64)}, "tensor names or shapes are not an AAADiT's (not enough values to unpack"),
        ({"blocks.x.to_q.weight": torch.zeros(1)}, "tensor names or shapes are not an AAADiT's (invalid literal for int()"),
    ],
)
def test_dit_layout_that_sizes_cannot_be_read_from_is_named(dit_file, tensors, expected):
    edited(dit_file, tensors)
    assert expected in error_of(load_dit, dit_file)


def test_dit_header_check_sees_metadata_and_shapes_without_reading_weights(dit_file, tmp_path):
    from aaa_core.dit import check_dit_file

    assert check_dit_file(dit_file) == TINY_DIT
    edited(dit_file, {"blocks.0.to_k.weight": torch.zeros(3, 3)})
    assert "tensor blocks.0.to_k.weight has shape (3, 3), expected (64, 64)" in error_of(check_dit_file, dit_file)


# --------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------


def test_unreadable_file_says_permission_denied_not_missing(dit_file, monkeypatch):
    """As root (CI), the refusal is simulated at the open call the loader makes."""

    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "open", refuse, raising=False)
    message = error_of(load_dit, dit_file)
    assert "permission denied: this user may not read the file" in message and "not found" not in message


def test_real_permissions_on_file_and_folder_are_one_line_errors():
    """A file with mode 000 and a file inside a folder without search permission, as a non-root user."""
    with shared_folder() as folder:
        save_tiny_dit(folder / "private.safetensors").chmod(0o000)
        locked = folder / "locked"
        locked.mkdir()
        save_tiny_dit(locked / "dit.safetensors")
        locked.chmod(0o600)  # readable listing, but no search (x): files inside cannot be opened
        out = run_unprivileged(
            "from aaa_core.dit import load_dit\n"
            "for name in ('private.safetensors', 'locked/dit.safetensors'):\n"
            "    try:\n"
            f"        load_dit({str(folder)!r} + '/' + name)\n"
            "    except Exception as err:\n"
            "        print(type(err).__name__, err)\n"
        )
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert lines[0] == f"ModelFileError {folder}/private.safetensors: permission denied: this user may not read the file (check its permissions)"
    assert lines[1] == (
        f"ModelFileError {folder}/locked/dit.safetensors: permission denied: this user cannot look inside the "
        f"folder {locked} (it needs search permission)"
    )


# --------------------------------------------------------------------------------------
# Text encoder folder: config.json and tokenizer files
# --------------------------------------------------------------------------------------


@pytest.fixture
def text_encoder_file(tmp_path, monkeypatch):
    """The tiny Qwen3 with its config.json; reading the weights fails the test (errors must come first)."""
    from aaa_core import text_encoder

    weights = save_tiny_text_encoder(tmp_path / "qwen")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the error was found")

    monkeypatch.setattr(text_encoder, "load_checkpoint", no_weights)
    return weights


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
        ({"rope_theta": "1e6"}, "rope_theta must be a positive number, got '1e6'"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
        ({"rope_scaling": {"rope_type": "bogus"}}, "rope_scaling has an unknown rope type 'bogus' (known: default, linear,"),
        ({"rope_scaling": "linear"}, "rope_scaling must be an object or null, got 'linear'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),  # transformers' own check, made one line
        ({"hidden_act": "no_such_activation"}, "hidden_act 'no_such_activation' is not an activation transformers knows"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),  # transformers' strict-dataclass check, made one line
        ({"head_dim": 7}, "even rotary dimension"),  # transformers' rope validator, made one line
    ],
)
def test_bad_text_encoder_config_values_name_the_file_and_key(text_encoder_file, changes, expected):
    from aaa_core.text_encoder import load_text_encoder

    config = text_encoder_file.parent / "config.json"
    edit_json(config, **changes)
    message = error_of(load_text_encoder, text_encoder_file, named=config)
    assert message.startswith(f"{config}: not a valid Qwen3 config.json (") and expected in message


@pytest.mark.parametrize("text, expected", [('{"model_type": "qwen3",', "the file is not valid JSON"), ("[1, 2]", "the file must be a JSON object, got list")])
def test_malformed_config_json_is_named(text_encoder_file, text, expected):
    from aaa_core.text_encoder import load_text_encoder

    config = text_encoder_file.parent / "config.json"
    config.write_text(text)
    assert error_of(load_text_encoder, text_encoder_file, named=config).startswith(f"{config}: {expected}")


@pytest.fixture
def tokenizer_folder(text_encoder_file):
    """The packaged tokenizer files copied beside the tiny weights, so they are the ones loaded."""
    from aaa_core.text_encoder import ASSETS_DIR

    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(ASSETS_DIR / name, text_encoder_file.parent / name)
    return text_encoder_file.parent


def test_chat_template_that_cannot_render_is_named(text_encoder_file, tokenizer_folder):
    from aaa_core.text_encoder import load_text_encoder

    edit_json(tokenizer_folder / "tokenizer_config.json", chat_template="{% for message in messages %}{{ message.content | no_such_filter }}{% endfor %}")
    message = error_of(load_text_encoder, text_encoder_file, named=tokenizer_folder / "tokenizer_config.json")
    assert message.startswith(f"{tokenizer_folder / 'tokenizer_config.json'}: the chat_template cannot be rendered (")
    assert "no_such_filter" in message


def test_malformed_tokenizer_json_is_named(text_encoder_file, tokenizer_folder):
    from aaa_core.text_encoder import load_text_encoder

    (tokenizer_folder / "vocab.json").write_text('{"a": 1,')
    vocab = tokenizer_folder / "vocab.json"
    assert error_of(load_text_encoder, text_encoder_file, named=vocab).startswith(f"{vocab}: the file is not valid JSON")
