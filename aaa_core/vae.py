"""The FLUX.2 VAE: images in [-1, 1] <-> normalised 128-channel latents at 1/16 resolution.

A plain-PyTorch re-implementation of diffusers' ``AutoencoderKLFlux2`` with DiffSynth-Studio's
``Flux2VAE`` behaviour folded in (``docs/diffsynth-aaa.md`` section 6): ``encode``
returns the posterior *mean* (no sampling), 2x2-patchified and normalised with the checkpoint's
BatchNorm running statistics; ``decode`` inverts that. Module names follow the diffusers file, so
``black-forest-labs/FLUX.2-klein-4B``'s ``vae/diffusion_pytorch_model.safetensors`` (251 tensors)
loads unchanged and strictly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    FLUX2_VAE,
    TensorInfo,
    adopt_state_dict,
    check_model_file,
    check_state_dict_matches,
    load_checkpoint,
)
from .errors import InputError, ModelFileError

GROUP_NORM_EPS = 1e-6  # every GroupNorm in the encoder and decoder (section 6)
PATCH = 2  # latents are 2x2-patchified: 32 channels at 1/8 -> 128 channels at 1/16 (section 6)


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig:
    """Model sizes; the defaults are those of the FLUX.2 (klein and dev) VAE file."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    latent_channels: int = 32  # before patchify; the model's latents have 4x as many
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4  # added to bn.running_var before the sqrt (section 6, encode step 4)

    def __post_init__(self) -> None:
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block width {channels} is not divisible by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "Flux2VAEConfig":
        """Infers the sizes from tensor shapes; ``norm_num_groups`` and ``batch_norm_eps`` keep their defaults.

        Neither is visible in the shapes, and the FLUX.2 file uses the defaults.
        """
        num_blocks = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down_blocks."))
        layers = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down_blocks.0.resnets."))
        return cls(
            block_out_channels=tuple(
                state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(num_blocks)
            ),
            layers_per_block=layers,
            latent_channels=state_dict["post_quant_conv.weight"].shape[0],
        )


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1-projected when the width changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU and add act on fresh tensors only (GroupNorm and conv outputs), which
        # saves one full-resolution activation per step and is still autograd-safe.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)


class Downsample(nn.Module):
    """Halves the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in the original LDM VAE


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A one-element Sequential so the key is diffusers' `to_out.0` (its `to_out.1` is a no-op Dropout).
        self.to_out = nn.Sequential(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        # One head of width C: SDPA's default scale 1/sqrt(C) is the reference's (section 6).
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out(F.scaled_dot_product_attention(q, k, v).squeeze(1))
        # Residual first, so the sum is contiguous (NCHW) rather than the strided view of `out`.
        return x + out.transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    """Resnet, self-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        # Registered in diffusers' order, so state_dict() lists keys in the file's order.
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# --------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """Encoder stage: resnets, then (except in the last stage) a Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    """Decoder stage: resnets, then (except in the last stage) an Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """RGB image -> posterior mean and log-variance (2 * latent_channels) at 1/8 resolution."""

    def __init__(self, c: Flux2VAEConfig):
        super().__init__()
        widths, last = c.block_out_channels, len(c.block_out_channels) - 1
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(widths[max(i - 1, 0)], width, c.layers_per_block, c.norm_num_groups, downsample=i < last)
                for i, width in enumerate(widths)
            ]
        )
        self.mid_block = MidBlock(widths[-1], c.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """Latents (latent_channels at 1/8 resolution) -> RGB image; the widths mirror the encoder's."""

    def __init__(self, c: Flux2VAEConfig):
        super().__init__()
        widths = tuple(reversed(c.block_out_channels))
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        # Registered before mid_block (diffusers' order) though it runs after it.
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(widths[max(i - 1, 0)], width, c.layers_per_block + 1, c.norm_num_groups, upsample=i < last)
                for i, width in enumerate(widths)
            ]
        )
        self.mid_block = MidBlock(widths[0], c.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


# --------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------


def patchify(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``, channel ``c*4 + p*2 + q`` for row offset p, column offset q.

    The same order as diffusers' ``Flux2Pipeline._patchify_latents`` and DiffSynth's rearrange.
    """
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, 4C, H, W) -> (B, C, 2H, 2W)``."""
    b, c, h, w = x.shape
    x = x.view(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (PATCH * PATCH), h * PATCH, w * PATCH)


class Flux2VAE(nn.Module):
    """Images in [-1, 1] <-> BatchNorm-normalised, patchified FLUX.2 latents (the DiT's input space)."""

    def __init__(self, config: Flux2VAEConfig = Flux2VAEConfig()):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        # Only the running statistics are used (never BatchNorm's forward); keeping the real
        # module gives the file's exact keys, including the int64 `bn.num_batches_tracked`.
        self.bn = nn.BatchNorm2d(PATCH * PATCH * c.latent_channels, eps=c.batch_norm_eps, affine=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def latent_channels(self) -> int:
        """Channels of the latents that ``encode`` returns and ``decode`` takes (128 for FLUX.2)."""
        return PATCH * PATCH * self.config.latent_channels

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (16 for FLUX.2: 8 from the encoder, 2 from patchify)."""
        return 2 ** (len(self.config.block_out_channels) - 1) * PATCH

    def latent_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchNorm mean and std as ``(1, C, 1, 1)`` tensors, cast to ``dtype`` *before* the sqrt.

        Casting first matches DiffSynth bit for bit in bfloat16 (section 6, encode step 4).
        """
        mean = self.bn.running_mean.to(dtype).view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.to(dtype) + self.config.batch_norm_eps).view(1, -1, 1, 1)
        return mean, std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1], on the model's device -> ``(B, 128, H/16, W/16)`` normalised latents.

        Deterministic: the posterior mean, never a sample (section 13, item 6).
        """
        self._check_images(images)
        h = self.quant_conv(self.encoder(images.to(self.dtype)))
        # After patchify the first 4*latent_channels channels are the patchified mean (the
        # channel order is c*4 + p*2 + q), so slicing the mean first gives the same result.
        h = patchify(h[:, : self.config.latent_channels])
        mean, std = self.latent_stats(h.dtype)
        return (h - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 128, h, w)`` normalised latents -> ``(B, 3, 16h, 16w)`` images, nominally in [-1, 1], not clamped."""
        self._check_latents(latents)
        latents = latents.to(self.dtype)
        mean, std = self.latent_stats(latents.dtype)
        z = unpatchify(latents * std + mean)
        return self.decoder(self.post_quant_conv(z))

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"VAE encode expects images of shape (batch, 3, height, width), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise InputError(f"VAE encode expects floating-point images in [-1, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        f = self.downscale_factor
        if height % f or width % f or height == 0 or width == 0:
            raise InputError(
                f"image size {width}x{height} is not a multiple of {f}; resize or crop it to a multiple "
                f"of {f} (e.g. {max(f, width // f * f)}x{max(f, height // f * f)})"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise InputError(
                f"VAE decode expects latents of shape (batch, {self.latent_channels}, height, width), "
                f"got {tuple(latents.shape)}"
            )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def vae_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: "str | os.PathLike[str]" = "state dict"
) -> Flux2VAE:
    """Builds a Flux2VAE sized from ``state_dict`` and loads it strictly (tensors are adopted, not copied)."""
    model = adopt_state_dict(empty_vae(state_dict, source), state_dict, source)
    variance = model.bn.running_var
    if not bool((variance > 0).all()):  # latents are divided by sqrt(var + 1e-4): zero or below is a corrupt file
        raise ModelFileError(
            f"{source}: tensor bn.running_var has {int((variance <= 0).sum())} of {variance.numel()} values <= 0 "
            f"(smallest {variance.min().item():.3g}); a variance must be positive: the file is corrupt"
        )
    return model


def empty_vae(state_dict: "Mapping[str, torch.Tensor | TensorInfo]", source: "str | os.PathLike[str]" = "state dict") -> Flux2VAE:
    """A Flux2VAE on the meta device sized from ``state_dict`` or a file's header (no memory, no init)."""
    try:
        config = Flux2VAEConfig.from_state_dict(state_dict)
    except KeyError as err:
        raise ModelFileError(f"{source}: not a complete FLUX.2 VAE checkpoint (missing {err})") from None
    except (ValueError, IndexError) as err:
        raise ModelFileError(f"{source}: not a complete FLUX.2 VAE checkpoint ({err})") from None
    with torch.device("meta"):
        return Flux2VAE(config)


def check_vae_file(path: "str | os.PathLike[str]") -> int:
    """Checks a FLUX.2 VAE file from its header alone (kind, every key and shape); returns its latent channels."""
    header, _ = check_model_file(path, FLUX2_VAE)
    model = empty_vae(header, path)
    check_state_dict_matches(model, header, path)
    return model.latent_channels


def load_vae(
    path: "str | os.PathLike[str]",
    dtype: torch.dtype | None = None,
    device: "str | torch.device" = "cpu",
) -> Flux2VAE:
    """Loads a FLUX.2 VAE file (diffusers format), in eval mode, without gradients.

    ``dtype`` casts every floating tensor, the BatchNorm statistics included (as DiffSynth
    does); ``bn.num_batches_tracked`` stays int64.
    """
    state_dict, _ = load_checkpoint(path, FLUX2_VAE, dtype=dtype, device=device)
    return vae_from_state_dict(state_dict, path)
