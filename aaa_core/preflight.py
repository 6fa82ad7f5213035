"""Checks that the three model files are usable together, before anything heavy is loaded.

Loading Qwen3, the DiT and the VAE takes a while; a wrong file found only at the third load, or
a DiT trained for another text encoder found only as a shape error in the first forward pass,
wastes that time. These checks read only headers, configs and tokenizers.
"""

from __future__ import annotations

import os

from .dit import AAADiTConfig, check_dit_file
from .errors import ModelFileError, combined
from .vae import check_vae_file

def check_models_fit(
    dit: AAADiTConfig,
    text_width: int,
    latent_channels: int,
    dit_name: object = "the AAADiT",
    text_name: object = "the text encoder",
    latent_name: object = "the VAE",
) -> None:
    """Raises a one-line error unless the DiT takes the text encoder's embeddings and the VAE's latents.

    ``text_width`` is the text encoder's hidden size (1024 for Qwen3-0.6B); ``latent_channels``
    is what the VAE produces (128 for FLUX.2). The names say which file or input is meant.
    """
    if dit.text_dim != text_width:
        raise ModelFileError(
            f"{dit_name}: this AAADiT takes {dit.text_dim}-wide text embeddings, but {text_name} gives "
            f"{text_width} (its hidden_size); use the text encoder the DiT was trained with"
        )
    if dit.latent_channels != latent_channels:
        raise ModelFileError(
            f"{dit_name}: this AAADiT works on {dit.latent_channels}-channel latents, but {latent_name} has "
            f"{latent_channels}; use the VAE the DiT was trained with"
        )


def check_model_files(
    dit: "str | os.PathLike[str]", text_encoder: "str | os.PathLike[str]", vae: "str | os.PathLike[str]"
) -> None:
    """Checks all three files from their headers (right model, readable, complete, consistent shapes)
    and then against each other; every bad file is named in one error, not one per run."""
    from .text_encoder import check_text_encoder_file  # imports transformers, which the sampler node must not

    results: dict[str, object] = {}
    problems: list[ModelFileError] = []
    checks = {
        "dit": (check_dit_file, dit),
        "text_encoder": (check_text_encoder_file, text_encoder),
        "vae": (check_vae_file, vae),
    }
    for key, (check, path) in checks.items():
        try:
            results[key] = check(path)
        except ModelFileError as err:
            problems.append(err)
    if problems:
        raise combined(problems, "model files are bad")
    check_models_fit(
        results["dit"], results["text_encoder"], results["vae"],
        dit_name=dit, text_name=f"the text encoder {text_encoder}", latent_name=f"the VAE {vae}",
    )
