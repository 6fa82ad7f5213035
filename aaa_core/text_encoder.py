"""Qwen3-0.6B text encoder: prompts to the (B, 128, 1024) embeddings AAADiT is conditioned on.

Follows the reference prompt path exactly (``docs/diffsynth-aaa.md`` section 7):
the Qwen3 chat template with thinking disabled, 128 tokens padded on the right with
``<|endoftext|>`` (or truncated), the attention mask passed to ``transformers.Qwen3Model``, and
the last hidden state after the final norm kept at all 128 positions, pads included.

The official ``Qwen/Qwen3-0.6B`` ``model.safetensors`` loads strictly, either from a folder in
the Hugging Face layout or as a single file under any name (ComfyUI's ``text_encoders``); the
config and tokenizer then come from beside the file if present, else from ``assets/qwen3_0.6b``
shipped with this package, so no download is ever needed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import stat
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from .checkpoint import (
    QWEN3,
    adopt_state_dict,
    check_model_file,
    check_path,
    check_state_dict_matches,
    load_checkpoint,
)
from .errors import InputError, ModelFileError, short_reason
from .geometry import TEXT_TOKENS
from .qwen3_config import build_empty_model, read_config, read_json_file

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
PAD_TOKEN_ID = 151643
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "qwen3_0.6b"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Either file set is a complete tokenizer; the packaged one is the smaller vocab + merges set.
_TOKENIZER_FILE_SETS = (
    ("tokenizer_config.json", "tokenizer.json"),
    ("tokenizer_config.json", "vocab.json", "merges.txt"),
)
# Every file transformers may read from a tokenizer folder: each one can change the token ids.
TOKENIZER_FILE_NAMES = (
    "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_TOKENIZER_JSON_FILES = tuple(name for name in TOKENIZER_FILE_NAMES if name.endswith(".json"))


# --------------------------------------------------------------------------------------
# Tokenizer and prompt template
# --------------------------------------------------------------------------------------


def has_tokenizer(folder: "str | os.PathLike[str]") -> bool:
    """True if ``folder`` holds a complete set of Hugging Face tokenizer files."""
    folder = Path(folder)
    return any(all((folder / name).is_file() for name in names) for names in _TOKENIZER_FILE_SETS)


def _read_tokenizer(folder: Path):
    for name in _TOKENIZER_JSON_FILES:  # a malformed file is named here; transformers would only say "cannot load"
        if (folder / name).is_file():
            read_json_file(folder / name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many types here; the user needs one line
        logger.debug("tokenizer load failed", exc_info=True)
        raise ModelFileError(f"{folder}: tokenizer files cannot be loaded ({short_reason(err)})") from None
    if tokenizer.pad_token_id != PAD_TOKEN_ID or not getattr(tokenizer, "chat_template", None):
        raise ModelFileError(
            f"{folder}: not the Qwen3 tokenizer (expected pad token {PAD_TOKEN} = {PAD_TOKEN_ID} "
            "and a chat template)"
        )
    # The reference relies on the defaults, which are right-side for both; pin them.
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    try:  # a broken template would otherwise fail at the first prompt, after the models are loaded
        build_prompt("a test prompt", tokenizer)
    except Exception as err:  # jinja2 raises several types; the user needs one line
        template = folder / ("chat_template.jinja" if (folder / "chat_template.jinja").is_file() else "tokenizer_config.json")
        raise ModelFileError(f"{template}: the chat_template cannot be rendered ({short_reason(err)})") from None
    return tokenizer


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer():
    return _read_tokenizer(ASSETS_DIR)


def load_tokenizer(folder: "str | os.PathLike[str] | None" = None):
    """The Qwen3 tokenizer from ``folder``, or the packaged one when ``folder`` is None.

    A folder given explicitly must hold the tokenizer files. The packaged tokenizer is loaded
    once and shared.
    """
    if folder is None:
        return _packaged_tokenizer()
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: tokenizer folder not found")
    if not has_tokenizer(folder):
        raise ModelFileError(
            f"{folder}: no tokenizer files (need tokenizer_config.json with tokenizer.json, "
            "or with vocab.json and merges.txt)"
        )
    return _read_tokenizer(folder)


def build_prompt(prompt: str, tokenizer=None) -> str:
    """The chat-templated text the reference tokenizes: one user turn, thinking disabled.

    For the Qwen3 template this is
    ``"<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n"``.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------


class Qwen3TextEncoder:
    """A Qwen3 model plus its tokenizer; ``encode`` turns prompts into AAADiT conditioning."""

    def __init__(self, model: Qwen3Model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``input_ids`` and ``attention_mask``, both ``(B, 128)`` int64 on the CPU."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("prompts must be a non-empty list of strings")
        texts = [build_prompt(prompt, self.tokenizer) for prompt in prompts]
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding="max_length",
            truncation=True,  # from the right: a long prompt loses the template tail, as in the reference
            max_length=TEXT_TOKENS,
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: "str | list[str]") -> torch.Tensor:
        """``(B, 128, hidden)`` embeddings in the model's dtype, on the model's device.

        This is ``hidden_states[-1]`` of the reference, which equals ``last_hidden_state``
        (after the final norm). Pad positions are kept: the DiT attends to them unmasked.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids, attention_mask = self.tokenize(prompts)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        )
        return output.last_hidden_state


# --------------------------------------------------------------------------------------
# Config and loading
# --------------------------------------------------------------------------------------


def _config_file(folder: Path) -> Path:
    """``folder/config.json`` if it describes a Qwen3 model, else the packaged 0.6B config."""
    candidate = folder / CONFIG_NAME
    if candidate.is_file():
        model_type = read_json_file(candidate).get("model_type")
        if model_type == "qwen3":
            return candidate
        # A shared folder (ComfyUI's text_encoders) may hold another model's config.json.
        logger.warning("%s: model_type is %r, not qwen3; using the packaged Qwen3-0.6B config", candidate, model_type)
    return ASSETS_DIR / CONFIG_NAME


def load_config(folder: "str | os.PathLike[str] | None" = None) -> Qwen3Config:
    """The Qwen3 config in ``folder`` if there is one, else the packaged Qwen3-0.6B config."""
    return read_config(ASSETS_DIR / CONFIG_NAME if folder is None else _config_file(Path(folder)))


def _weights_file(path: Path) -> Path:
    """The weights file of a single file or a ``Qwen/Qwen3-0.6B`` folder."""
    if not stat.S_ISDIR(check_path(path).st_mode):  # check_path: one line for a folder that cannot be searched too
        return path
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelFileError(f"{path}: folder has no {WEIGHTS_NAME} (expected the Qwen/Qwen3-0.6B layout)")
    return weights


@dataclasses.dataclass(frozen=True)
class EncoderFiles:
    """The files that decide what a text encoder computes, as :func:`load_text_encoder` picks them."""

    weights: Path
    config: Path
    tokenizer: tuple[Path, ...]


def encoder_files(path: "str | os.PathLike[str]") -> EncoderFiles:
    """Which weights, config and tokenizer files loading ``path`` would use (nothing heavy is read).

    The training cache keys prompt embeddings on all of them: a changed ``rope_theta`` in
    ``config.json`` or an edited chat template changes every embedding.
    """
    weights = _weights_file(Path(path))
    folder = weights.parent
    tokenizer_folder = folder if has_tokenizer(folder) else ASSETS_DIR
    tokenizer = tuple(tokenizer_folder / name for name in TOKENIZER_FILE_NAMES if (tokenizer_folder / name).is_file())
    return EncoderFiles(weights, _config_file(folder), tokenizer)


def _to_model_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys carry a ``model.`` prefix and a tied ``lm_head.weight``; Qwen3Model has neither."""
    return {
        (key[len("model."):] if key.startswith("model.") else key): tensor
        for key, tensor in state_dict.items()
        if key != "lm_head.weight"  # section 7: the reference converter only drops this key
    }


def _check_sizes(state_dict: dict[str, torch.Tensor], config: Qwen3Config, config_file: Path, path: Path) -> None:
    """One-line error when the weights belong to a Qwen3 of another size than ``config``.

    Without this, a size mismatch shows up as a list of missing layers or one odd tensor shape.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "head_dim": head_dim,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    found: dict[str, int] = {}
    if "embed_tokens.weight" in state_dict:
        found["vocab_size"], found["hidden_size"] = state_dict["embed_tokens.weight"].shape
    layers = {int(key.split(".")[1]) for key in state_dict if key.startswith("layers.") and key.split(".")[1].isdigit()}
    if layers:
        found["num_hidden_layers"] = max(layers) + 1
    if "layers.0.self_attn.q_norm.weight" in state_dict:  # per-head norm: its size is head_dim
        found["head_dim"] = state_dict["layers.0.self_attn.q_norm.weight"].shape[0]
        for name, proj in (("num_attention_heads", "q_proj"), ("num_key_value_heads", "k_proj")):
            if f"layers.0.self_attn.{proj}.weight" in state_dict:
                found[name] = state_dict[f"layers.0.self_attn.{proj}.weight"].shape[0] // found["head_dim"]
    if "layers.0.mlp.gate_proj.weight" in state_dict:
        found["intermediate_size"] = state_dict["layers.0.mlp.gate_proj.weight"].shape[0]
    diffs = [f"{name} {value} in the weights vs {expected[name]}" for name, value in found.items() if value != expected[name]]
    if diffs:
        raise ModelFileError(
            f"{path}: weight shapes do not match the config {config_file} ({'; '.join(diffs)}); "
            "put the model's config.json beside the weights"
        )


def _text_encoder_files(path: Path) -> tuple[Path, Path, Qwen3Config, object]:
    """The weights file, config file, validated config and tokenizer for a folder or a single weights file.

    Everything here is small; a bad config or tokenizer is reported before any weight is read.
    """
    weights = _weights_file(path)
    folder = weights.parent
    config_file = _config_file(folder)
    config = read_config(config_file)
    tokenizer = load_tokenizer(folder if has_tokenizer(folder) else None)  # None: the packaged tokenizer
    if len(tokenizer) > config.vocab_size:
        raise ModelFileError(
            f"{weights}: the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}"
        )
    return weights, config_file, config, tokenizer


def check_text_encoder_file(path: "str | os.PathLike[str]") -> int:
    """Checks a Qwen3 text encoder from its config, tokenizer and weights header alone; returns its hidden size."""
    weights, config_file, config, _ = _text_encoder_files(Path(path))
    header, _ = check_model_file(weights, QWEN3)
    header = _to_model_keys(header)
    _check_sizes(header, config, config_file, weights)
    check_state_dict_matches(build_empty_model(config), header, weights)
    return config.hidden_size


def load_text_encoder(
    path: "str | os.PathLike[str]",
    dtype: torch.dtype | None = None,
    device: "str | torch.device" = "cpu",
) -> Qwen3TextEncoder:
    """Loads Qwen3 from a ``Qwen/Qwen3-0.6B`` folder or a single ``.safetensors`` file.

    ``dtype`` None keeps the file's dtype (bf16 for the official file). The model is in eval
    mode without gradients; tensors are read straight onto ``device``.
    """
    weights, config_file, config, tokenizer = _text_encoder_files(Path(path))
    state_dict, _ = load_checkpoint(weights, QWEN3, dtype=dtype, device=device)
    state_dict = _to_model_keys(state_dict)
    _check_sizes(state_dict, config, config_file, weights)
    model = adopt_state_dict(build_empty_model(config), state_dict, weights)

    # RoPE's inv_freq is a non-persistent buffer: not in the file, so still on the meta device.
    # Rebuild it on the device, then cast it to the weights' dtype as the reference's final
    # `.to(torch_dtype)` does (sections 7 and 11). In bf16 that rounds the frequencies, and the
    # published DiT was trained on embeddings computed that way.
    with torch.device(device):
        rotary = type(model.rotary_emb)(model.config)
    model.rotary_emb = rotary.to(model.embed_tokens.weight.dtype)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError("Qwen3Model still has tensors on the meta device after loading")

    logger.info(
        "Loaded Qwen3 text encoder %s (config %s, tokenizer %s, %s on %s)",
        weights, config_file, tokenizer.name_or_path, model.embed_tokens.weight.dtype, device,
    )
    return Qwen3TextEncoder(model, tokenizer)
