"""The encoding pass: every image the cache lacks goes through the VAE, every prompt through Qwen3, once.

Each entry the data set needs is read and checked first (a damaged one is named and encoded
again); with several processes each then encodes its share of what is missing, and every process
sees all entries once the pass is done. Images are encoded at their bucket's size, one size per
VAE batch.
"""

from __future__ import annotations

import dataclasses
import logging
from itertools import groupby
from pathlib import Path
from typing import Collection

import torch

from aaa_core.errors import InputError
from aaa_core.text_encoder import load_text_encoder
from aaa_core.vae import load_vae

from .cache import CacheStats, EncodingCache
from .pairs import load_image
from .processes import Processes
from .progress import Progress

log = logging.getLogger(__name__)

# Said instead of the trainer's "interrupted without saving": nothing but cache entries exists yet.
STOPPED_WHILE_ENCODING = (
    "stopped while filling the encoding cache; the entries encoded so far are kept: run the same command again to go on"
)


@dataclasses.dataclass(frozen=True)
class LatentEntry:
    """One image's latent as the data set needs it: the file, its cache key and its bucket's (width, height)."""

    image: Path
    key: str
    size: tuple[int, int]


@dataclasses.dataclass
class FilledCache:
    """What the pass leaves: the entries read (when kept), which latents exist, and why images were left out."""

    latents: dict[str, torch.Tensor]  # key -> tensor, only with keep=True
    texts: dict[str, torch.Tensor]  # key -> tensor, only with keep=True
    present: set[str]  # latent keys whose entry is on disk and sound
    failures: dict[Path, str]  # unreadable image -> reason
    stats: CacheStats


def fill_cache(
    latent_entries: list[LatentEntry],
    prompts: dict[str, str],
    cache: EncodingCache,
    vae_path: Path,
    text_encoder_path: Path,
    device: torch.device,
    batch_size: int,
    processes: Processes = Processes(),
    keep: bool = True,
    keep_prompts: Collection[str] = (),
) -> FilledCache:
    """Makes every entry exist and be sound (``prompts``: text -> key); ``keep`` holds what was read in memory.

    Without ``keep`` each entry is checked and dropped again, so memory stays flat however large
    the data set (the packed path reads the entries once more while writing its shards); the
    prompt keys in ``keep_prompts`` (the sample grids') are held either way.
    """
    stats, main, rank, world_size = CacheStats(), processes.is_main, processes.rank, processes.world_size
    if main:
        for left_over in cache.sweep_temp_files():
            log.info("deleted %s (left by an interrupted encoding)", left_over)
    entries = list({entry.key: entry for entry in latent_entries}.values())  # an image listed twice is read once
    latents: dict[str, torch.Tensor] = {}
    texts: dict[str, torch.Tensor] = {}

    def read_latent(entry: LatentEntry) -> bool:
        tensor = cache.load("latents", entry.key, str(entry.image), report=main, size=entry.size)
        if tensor is not None and keep:
            latents[entry.key] = tensor
        return tensor is not None

    def read_text(prompt: str, key: str) -> bool:
        tensor = cache.load("text", key, prompt, report=main)
        if tensor is not None and (keep or key in keep_prompts):
            texts[key] = tensor
        return tensor is not None

    missing_images = [entry for entry in entries if not read_latent(entry)]
    missing_prompts = [(prompt, key) for prompt, key in prompts.items() if not read_text(prompt, key)]
    if main:
        log.info("cache %s: %d of %d images and %d of %d prompts to encode",
                 cache.root, len(missing_images), len(entries), len(missing_prompts), len(prompts))
    processes.barrier()  # every process has checked the entries before any is rewritten
    failures = _encode_images(missing_images[rank::world_size], cache, vae_path, device, batch_size, stats, main, processes.stop_requested)
    _encode_prompts(missing_prompts[rank::world_size], cache, text_encoder_path, device, batch_size, stats, main, processes.stop_requested)
    processes.barrier()  # every share is on disk before anyone reads
    missing_keys = {entry.key for entry in missing_images if not read_latent(entry)}  # written by any process, or unreadable
    if any(not read_text(prompt, key) for prompt, key in missing_prompts):
        shared = " (with several machines, the cache must be on a disk all of them share: --cache-dir)" if world_size > 1 else ""
        raise InputError(f"cache {cache.root}: a prompt embedding is missing after encoding{shared}; see the messages above")
    present = {entry.key for entry in entries} - missing_keys
    return FilledCache(latents, texts, present, failures, stats)


def _encode_images(entries: list[LatentEntry], cache, vae_path, device, batch_size, stats, main, should_stop) -> dict[Path, str]:
    """Encodes and stores ``entries``, one bucket size per VAE batch; returns why each unreadable image was left out."""
    vae, failures = None, {}
    batches = []
    for _, same_size in groupby(sorted(entries, key=lambda entry: entry.size), key=lambda entry: entry.size):
        same_size = list(same_size)
        batches += [same_size[start : start + batch_size] for start in range(0, len(same_size), batch_size)]
    with Progress(len(entries), "encoding images", "images", enabled=main) as bar:
        for batch in batches:
            if should_stop():
                raise KeyboardInterrupt(STOPPED_WHILE_ENCODING)
            chunk, pixels = [], []
            for entry in batch:
                try:
                    pixels.append(load_image(entry.image, *entry.size, cache.dtype))
                    chunk.append(entry)
                except InputError as err:  # counted as skipped once all shares are done
                    failures[entry.image] = str(err).removeprefix(f"{entry.image}: ")
                    if not main:  # the main process reports its own failures in the skip summary
                        log.warning("skipped %s: %s", entry.image.name, failures[entry.image])
            if chunk:
                if vae is None:  # loaded only when at least one image needs it
                    vae = load_vae(vae_path, dtype=cache.dtype, device=device)
                    stats.vae_loaded = True
                with torch.inference_mode():
                    encoded = vae.encode(torch.stack(pixels).to(device)).cpu()
                for entry, latent in zip(chunk, encoded):
                    cache.write("latents", entry.key, latent.clone(), str(entry.image), size=entry.size)
                stats.images_encoded += len(chunk)
            bar.update(len(batch))
    del vae
    _free_memory(device)
    return failures


def _encode_prompts(prompts: list[tuple[str, str]], cache, text_encoder_path, device, batch_size, stats, main, should_stop) -> None:
    if not prompts:
        return
    encoder = load_text_encoder(text_encoder_path, dtype=cache.dtype, device=device)
    stats.text_encoder_loaded = True
    with Progress(len(prompts), "encoding prompts", "prompts", enabled=main) as bar:
        for start in range(0, len(prompts), batch_size):
            if should_stop():
                raise KeyboardInterrupt(STOPPED_WHILE_ENCODING)
            chunk = prompts[start : start + batch_size]
            embeds = encoder.encode([prompt for prompt, _ in chunk]).cpu()
            for (prompt, key), embed in zip(chunk, embeds):
                cache.write("text", key, embed.clone(), prompt)
            stats.prompts_encoded += len(chunk)
            bar.update(len(chunk))
    del encoder
    _free_memory(device)


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
