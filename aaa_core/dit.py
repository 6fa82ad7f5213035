"""AAADiT: the ~0.13B text-to-image diffusion transformer on FLUX.2 latents.

The architecture and every state-dict key follow DiffSynth-Studio's "train from scratch"
tutorial (``docs/diffsynth-aaa.md`` section 4), so its published
``step-600000.safetensors`` loads strictly. Unlike the reference, the forward pass takes one
timestep per sample, so batched classifier-free guidance and batched training work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from types import ModuleType, SimpleNamespace
from typing import Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import (
    AAADIT,
    TensorInfo,
    adopt_state_dict,
    check_model_file,
    check_state_dict_matches,
    load_checkpoint,
)
from .config_values import json_object, positive_int
from .errors import ModelFileError

CONFIG_METADATA_KEY = "aaa_dit_config"

# Where layer classes come from: ``torch.nn`` by default. ComfyUI passes ``comfy.ops.manual_cast``
# (same constructors) so its memory manager can stream weights in low-VRAM mode.
Operations = Union[ModuleType, SimpleNamespace, type]


@dataclasses.dataclass(frozen=True)
class AAADiTConfig:
    """Model sizes; the defaults are the published checkpoint's."""

    dim: int = 1024
    depth: int = 10
    num_heads: int = 32  # head_dim 32 in the reference
    latent_channels: int = 128  # FLUX.2 VAE latents, 2x2-patchified 32 channels
    text_dim: int = 1024  # Qwen3-0.6B hidden size
    ff_mult: int = 3
    time_freq_dim: int = 256
    pos_height: int = 16  # learned image position table, resized bilinearly to the latent size
    pos_width: int = 16

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            positive_int(field.name, getattr(self, field.name))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> "AAADiTConfig":
        """Infers the sizes from tensor shapes (or header entries); ``num_heads`` comes from metadata or head_dim 32.

        Sizes stored in the metadata must agree with the shapes: a disagreement means the metadata
        was edited or belongs to another file, and guessing which one is right would be worse.
        """
        stored = _stored_config(metadata or {})
        try:
            dim, latent_channels = state_dict["image_embedder.0.weight"].shape
            depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
            _, _, pos_height, pos_width = state_dict["pos_embedder.image_emb"].shape
            inferred = dict(
                dim=dim,
                depth=depth,
                latent_channels=latent_channels,
                text_dim=state_dict["text_embedder.0.weight"].shape[1],
                ff_mult=state_dict["blocks.0.ff.0.weight"].shape[0] // dim,
                time_freq_dim=state_dict["timestep_embedder.timestep_embedder.0.weight"].shape[1],
                pos_height=pos_height,
                pos_width=pos_width,
            )
        except (ValueError, IndexError, ZeroDivisionError) as err:  # a tensor of the wrong rank, a key like blocks.x
            raise ValueError(f"tensor names or shapes are not an AAADiT's ({err})") from None
        for name, value in stored.items():
            if name in inferred and value != inferred[name]:
                raise ValueError(
                    f"metadata {CONFIG_METADATA_KEY} says {name} {value}, but the weights' shapes give {inferred[name]}"
                )
        num_heads = stored.get("num_heads", default_num_heads(dim))
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads} (metadata {CONFIG_METADATA_KEY})")
        return cls(num_heads=num_heads, **inferred)


def _stored_config(metadata: Mapping[str, str]) -> dict[str, int]:
    """The sizes our trainer stores in the checkpoint metadata, type-checked; empty for the published file."""
    if CONFIG_METADATA_KEY not in metadata:
        return {}
    where = f"metadata {CONFIG_METADATA_KEY}"
    stored = json_object(metadata[CONFIG_METADATA_KEY], where)
    known = {field.name for field in dataclasses.fields(AAADiTConfig)}
    for name, value in stored.items():
        if name not in known:
            raise ValueError(f"{where} has an unknown key {name!r} (known: {', '.join(sorted(known))})")
        positive_int(f"{where} {name}", value)
    return stored


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

# Named sizes for the trainer's --model, one line each (DiT's S/B/L/XL idea): dim, depth, num_heads.
# Parameter counts with FLUX.2 latents and Qwen3-0.6B prompts (128 channels in, 1024 wide), as tested.
DIT_PRESETS: dict[str, AAADiTConfig] = {
    "AAA-S": AAADiTConfig(dim=512, depth=8, num_heads=16),  # 26.4M, head_dim 32
    "AAA-B": AAADiTConfig(dim=1024, depth=10, num_heads=32),  # 128.8M, head_dim 32: the published step-600000
    "AAA-L": AAADiTConfig(dim=1536, depth=16, num_heads=24),  # 458.4M, head_dim 64
    "AAA-XL": AAADiTConfig(dim=2048, depth=20, num_heads=32),  # 1014.9M, head_dim 64
}
DEFAULT_PRESET = "AAA-B"


def default_num_heads(dim: int) -> int:
    """Heads for a file whose metadata does not say: the preset of that width's, else head_dim 32 as the reference."""
    preset = next((c for c in DIT_PRESETS.values() if c.dim == dim), None)
    return preset.num_heads if preset else max(1, dim // 32)


# --------------------------------------------------------------------------------------
# Embedding layers
# --------------------------------------------------------------------------------------


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos, sin]`` features of the raw 0..1000 timestep, in float32 (section 4.1).

    The operation order matches the reference bit for bit: exponent, divide, exp, product.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)
    args = timesteps[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by an MLP; keys ``timestep_embedder.{0,2}``."""

    def __init__(self, freq_dim: int, dim: int, ops: Operations = nn):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = nn.Sequential(ops.Linear(freq_dim, dim), nn.SiLU(), ops.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_embedding(timesteps, self.freq_dim).to(dtype))


class PositionalEmbedding(nn.Module):
    """A learned image table (bilinearly resized to the latent grid) plus one shared text vector."""

    def __init__(self, dim: int, height: int, width: int):
        super().__init__()
        self.image_emb = nn.Parameter(torch.randn(1, dim, height, width))
        self.text_emb = nn.Parameter(torch.randn(dim))

    def forward(self, height: int, width: int, text_len: int, like: torch.Tensor) -> torch.Tensor:
        # Moved as well as cast: in ComfyUI's low-VRAM mode these parameters may stay offloaded.
        image = self.image_emb.to(device=like.device, dtype=like.dtype)
        image = F.interpolate(image, size=(height, width), mode="bilinear")
        image = image.flatten(2).transpose(1, 2)  # (1, H*W, dim), row-major tokens
        text = self.text_emb.to(device=like.device, dtype=like.dtype).expand(1, text_len, -1)
        return torch.cat([image, text], dim=1)  # (1, H*W + L, dim), shared by the batch


# --------------------------------------------------------------------------------------
# Core model
# --------------------------------------------------------------------------------------


class AAABlock(nn.Module):
    """Joint image+text attention and MLP, each gated by ``(1 + gate(t))``.

    The position embedding enters only the normalisation input, never the residual stream.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int, ops: Operations = nn):
        super().__init__()
        self.num_heads = num_heads
        self.norm_attn = nn.RMSNorm(dim, elementwise_affine=False)
        self.to_q = ops.Linear(dim, dim)
        self.to_k = ops.Linear(dim, dim)
        self.to_v = ops.Linear(dim, dim)
        self.to_out = ops.Linear(dim, dim)
        self.norm_mlp = nn.RMSNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(ops.Linear(dim, dim * ff_mult), nn.SiLU(), ops.Linear(dim * ff_mult, dim))
        self.to_gate = ops.Linear(dim, dim * 2)

    def attention(self, x: torch.Tensor, queries: int) -> torch.Tensor:
        """Self-attention over all of ``x``, returning outputs for its first ``queries`` tokens."""
        batch, seq, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # channels split head-major (head * head_dim + d), as the reference
            return t.view(batch, t.shape[1], self.num_heads, -1).transpose(1, 2)

        q = heads(self.to_q(x[:, :queries]))
        out = F.scaled_dot_product_attention(q, heads(self.to_k(x)), heads(self.to_v(x)))  # unmasked, scale 1/sqrt(head_dim)
        return self.to_out(out.transpose(1, 2).reshape(batch, queries, dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, t_emb: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Returns the updated tokens; with ``keep``, only the first ``keep`` (the rest feed keys and values only)."""
        keep = x.shape[1] if keep is None else keep
        gate_attn, gate_mlp = self.to_gate(t_emb).chunk(2, dim=-1)
        attn = self.attention(self.norm_attn(x + pos), keep)
        x, pos = x[:, :keep], pos[:, :keep]
        x = x + attn * (1 + gate_attn)
        x = x + self.ff(self.norm_mlp(x + pos)) * (1 + gate_mlp)
        return x


class AAADiT(nn.Module):
    """Predicts the flow-matching velocity ``noise - x0`` for FLUX.2 latents given Qwen3 text states."""

    def __init__(self, config: AAADiTConfig = AAADiTConfig(), operations: Operations = nn):
        super().__init__()
        self.config = config
        c, ops = config, operations
        self.pos_embedder = PositionalEmbedding(c.dim, c.pos_height, c.pos_width)
        self.timestep_embedder = TimestepEmbedder(c.time_freq_dim, c.dim, ops)
        self.image_embedder = nn.Sequential(ops.Linear(c.latent_channels, c.dim), ops.LayerNorm(c.dim))
        self.text_embedder = nn.Sequential(ops.Linear(c.text_dim, c.dim), ops.LayerNorm(c.dim))
        self.blocks = nn.ModuleList([AAABlock(c.dim, c.num_heads, c.ff_mult, ops) for _ in range(c.depth)])
        self.proj_out = ops.Linear(c.dim, c.latent_channels)
        self.gradient_checkpointing = False
        # Only image tokens are read out, so the last block can skip the text tokens' queries,
        # output projection and MLP: about 3% of the FLOPs, the same result. False does all the
        # work the reference does (benchmarks use it to time the reference fairly).
        self.last_block_image_only = True

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``latents (B,C,H,W)``, ``prompt_embeds (B,L,text_dim)``, ``timestep`` = 1000*sigma, shape ``(B,)`` or ``(1,)``."""
        batch, _, height, width = latents.shape
        dtype = latents.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        timestep = timestep.reshape(-1).expand(batch)
        pos = self.pos_embedder(height, width, prompt_embeds.shape[1], latents)
        t_emb = self.timestep_embedder(timestep, dtype)[:, None, :]  # (B, 1, dim): one per sample
        image = self.image_embedder(latents.flatten(2).transpose(1, 2))
        x = torch.cat([image, self.text_embedder(prompt_embeds)], dim=1)  # image tokens first
        for i, block in enumerate(self.blocks):
            keep = height * width if self.last_block_image_only and i == len(self.blocks) - 1 else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, pos, t_emb, keep, use_reentrant=False)
            else:
                x = block(x, pos, t_emb, keep)
        out = self.proj_out(x[:, : height * width])
        return out.transpose(1, 2).reshape(batch, -1, height, width)

    def flops_per_forward(self, image_tokens: int, text_tokens: int) -> float:
        """Matmul FLOPs (2 per multiply-add) one forward pass executes for one sample (section 4.4)."""
        c, seq = self.config, image_tokens + text_tokens
        d2 = c.dim * c.dim

        def block(queries: int) -> float:  # q, out and the MLP per query token; k and v per token; QK^T and AV
            return 2 * queries * (2 + 2 * c.ff_mult) * d2 + 2 * seq * 2 * d2 + 4 * queries * seq * c.dim

        last = block(image_tokens if self.last_block_image_only else seq)
        embed = 2 * (text_tokens * c.text_dim * c.dim + image_tokens * c.latent_channels * c.dim * 2)
        gates = 2 * (c.depth * 2 * d2 + c.time_freq_dim * c.dim + d2)
        return (c.depth - 1) * block(seq) + last + embed + gates


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def dit_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: "str | os.PathLike[str]" = "state dict",
    operations: Operations = nn,
    model_class: type[AAADiT] = AAADiT,
) -> AAADiT:
    """Builds an AAADiT sized from ``state_dict`` and loads it strictly (tensors are adopted, not copied).

    ``model_class`` may be a subclass with another calling convention (ComfyUI's, in the nodes).
    """
    return adopt_state_dict(empty_dit(state_dict, metadata, source, operations, model_class), state_dict, source)


def empty_dit(
    state_dict: "Mapping[str, torch.Tensor | TensorInfo]",
    metadata: Mapping[str, str] | None = None,
    source: "str | os.PathLike[str]" = "state dict",
    operations: Operations = nn,
    model_class: type[AAADiT] = AAADiT,
) -> AAADiT:
    """An AAADiT on the meta device sized from ``state_dict`` or a file's header (no memory, no init)."""
    try:
        config = AAADiTConfig.from_state_dict(state_dict, metadata)
    except KeyError as err:
        raise ModelFileError(f"{source}: not a complete AAADiT checkpoint (missing {err})") from None
    except ValueError as err:
        raise ModelFileError(f"{source}: {err}") from None
    with torch.device("meta"):
        return model_class(config, operations)


def check_dit_file(path: "str | os.PathLike[str]") -> AAADiTConfig:
    """Checks an AAADiT file from its header alone (kind, metadata, every key and shape); returns its config."""
    header, metadata = check_model_file(path, AAADIT)
    model = empty_dit(header, metadata, path)
    check_state_dict_matches(model, header, path)
    return model.config


def load_dit(
    path: "str | os.PathLike[str]",
    dtype: torch.dtype | None = None,
    device: "str | torch.device" = "cpu",
    operations: Operations = nn,
    model_class: type[AAADiT] = AAADiT,
) -> AAADiT:
    """Loads an AAADiT checkpoint (the published one or ours), in eval mode, without gradients."""
    state_dict, metadata = load_checkpoint(path, AAADIT, dtype=dtype, device=device)
    return dit_from_state_dict(state_dict, metadata, path, operations, model_class)
