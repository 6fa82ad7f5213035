"""The encoding cache: each image goes through the frozen VAE once, each prompt through Qwen3 once.

Entries are small safetensors files, one per image (the VAE latent mean, ``(128, R/16, R/16)``)
and one per distinct prompt (``(128, 1024)`` embeddings), named by a hash of everything that
decides their content:

- latents: the image file's bytes, the resolution, the pre-processing, the VAE file, the dtype;
- prompts: the text, the text-encoder file, the dtype.

So a changed image, caption, model file, size or dtype re-encodes exactly the affected
entries, and a run whose entries all exist never loads the encoders. Each entry is written
atomically, so an interrupted encoding keeps what it finished. With several processes each
encodes its share of the missing entries; then every process reads them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from aaa_core.checkpoint import atomic_output, read_safetensors, save_safetensors
from aaa_core.errors import InputError
from aaa_core.text_encoder import load_text_encoder
from aaa_core.vae import load_vae

from .data import Sample, Skipped, load_image

log = logging.getLogger(__name__)

# Bump when load_image's pixels change (file decoding, resize, crop), to invalidate old latents.
PREPROCESS_VERSION = "open_rgb-alpha-dropped-high-bit-scaled+resize_cover-bilinear+centre-crop/2"


@dataclasses.dataclass
class CacheStats:
    """What filling the cache cost on this process (tests and the log read it)."""

    images_encoded: int = 0
    prompts_encoded: int = 0
    vae_loaded: bool = False
    text_encoder_loaded: bool = False


@dataclasses.dataclass
class EncodedData:
    """The whole encoded data set in memory; sample ``i`` is ``latents[image_index[i]]`` with ``text[text_index[i]]``."""

    latents: torch.Tensor  # (images, 128, h, w)
    text: torch.Tensor  # (prompts, 128, text_dim)
    image_index: torch.Tensor  # (samples,) int64
    text_index: torch.Tensor  # (samples,) int64
    captions: list[str]  # per sample
    extra_prompts: dict[str, torch.Tensor]  # validation and negative prompts -> (128, text_dim)
    fingerprint: str  # changes when any sample's inputs change; a resumed run checks it
    stats: CacheStats

    def __len__(self) -> int:
        return len(self.image_index)

    def to(self, device: torch.device) -> "EncodedData":
        return dataclasses.replace(
            self,
            latents=self.latents.to(device), text=self.text.to(device),
            image_index=self.image_index.to(device), text_index=self.text_index.to(device),
        )


def _hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: Path, memo_file: Path) -> str:
    """The SHA-256 of a model file, remembered by (path, size, mtime) so it is computed once."""
    weights = path / "model.safetensors" if path.is_dir() else path
    stat = weights.stat()
    key = str(weights.resolve())
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key, {})
    if entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    log.info("hashing %s (once; identifies the model in the cache keys)", weights)
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(weights)}
    with atomic_output(memo_file) as tmp:
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
    return memo[key]["sha256"]


class EncodingCache:
    """Entry files under ``root/latents`` and ``root/text``, addressed by content keys."""

    def __init__(self, root: Path, vae_path: Path, text_encoder_path: Path, resolution: int, dtype: torch.dtype):
        self.root = root
        memo = root / "model_fingerprints.json"
        self.vae_id = model_fingerprint(vae_path, memo)
        self.text_encoder_id = model_fingerprint(text_encoder_path, memo)
        self.resolution = resolution
        self.dtype = dtype

    def latent_key(self, image_sha: str) -> str:
        return _hash("latent", image_sha, self.resolution, PREPROCESS_VERSION, self.vae_id, self.dtype)

    def text_key(self, prompt: str) -> str:
        return _hash("text", prompt, self.text_encoder_id, self.dtype)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def write(self, kind: str, key: str, tensor: torch.Tensor, source: str) -> None:
        save_safetensors({kind: tensor}, self.path(kind, key), {"source": source[:1000]})

    def read(self, kind: str, key: str) -> torch.Tensor:
        state, _ = read_safetensors(self.path(kind, key))
        return state[kind]


def encode_dataset(
    samples: list[Sample],
    extra_prompts: list[str],
    cache: EncodingCache,
    vae_path: Path,
    text_encoder_path: Path,
    device: torch.device,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[EncodedData, list[Skipped]]:
    """Encodes what the cache lacks (this process's share), then reads the whole data set.

    Returns the encoded data and the samples whose image turned out to be unreadable.
    """
    stats = CacheStats()
    image_sha = {s.image: file_sha256(s.image) for s in samples}
    latent_keys = {image: cache.latent_key(sha) for image, sha in image_sha.items()}
    prompts = list(dict.fromkeys([s.caption for s in samples] + list(extra_prompts)))
    text_keys = {prompt: cache.text_key(prompt) for prompt in prompts}

    missing_images = [image for image, key in latent_keys.items() if not cache.has("latents", key)]
    missing_prompts = [prompt for prompt, key in text_keys.items() if not cache.has("text", key)]
    main = rank == 0
    if main:
        log.info(
            "cache %s: %d of %d images and %d of %d prompts to encode",
            cache.root, len(missing_images), len(latent_keys), len(missing_prompts), len(text_keys),
        )
    _encode_images(missing_images[rank::world_size], latent_keys, cache, vae_path, device, batch_size, stats, main, should_stop)
    _encode_prompts(missing_prompts[rank::world_size], text_keys, cache, text_encoder_path, device, batch_size, stats, main, should_stop)
    barrier()  # every share is on disk before anyone reads

    skipped, used = [], []
    for sample in samples:
        if cache.has("latents", latent_keys[sample.image]):
            used.append(sample)
        else:
            skipped.append(Skipped(sample.image.name, "unreadable image"))
    if not used:
        raise InputError("no image could be read; see the messages above")

    image_order = list(dict.fromkeys(latent_keys[s.image] for s in used))
    text_order = list(dict.fromkeys(text_keys[s.caption] for s in used))
    image_slot = {key: i for i, key in enumerate(image_order)}
    text_slot = {key: i for i, key in enumerate(text_order)}
    data = EncodedData(
        latents=torch.stack([cache.read("latents", key) for key in image_order]),
        text=torch.stack([cache.read("text", key) for key in text_order]),
        image_index=torch.tensor([image_slot[latent_keys[s.image]] for s in used]),
        text_index=torch.tensor([text_slot[text_keys[s.caption]] for s in used]),
        captions=[s.caption for s in used],
        extra_prompts={prompt: cache.read("text", text_keys[prompt]) for prompt in extra_prompts},
        fingerprint=_hash(*(f"{latent_keys[s.image]}:{text_keys[s.caption]}" for s in used)),
        stats=stats,
    )
    return data, skipped


def _encode_images(images, keys, cache, vae_path, device, batch_size, stats, main, should_stop) -> None:
    vae = None
    with tqdm(total=len(images), desc="encoding images", unit="img", disable=None if main else True) as bar:
        for start in range(0, len(images), batch_size):
            if should_stop():
                raise KeyboardInterrupt
            chunk, pixels = [], []
            for image in images[start : start + batch_size]:
                try:
                    pixels.append(load_image(image, cache.resolution, cache.dtype))
                    chunk.append(image)
                except InputError as err:  # reported here; counted as skipped once all shares are done
                    log.warning("skipped %s: %s", image.name, err)
            if chunk:
                if vae is None:  # loaded only when at least one image needs it
                    vae = load_vae(vae_path, dtype=cache.dtype, device=device)
                    stats.vae_loaded = True
                with torch.inference_mode():
                    latents = vae.encode(torch.stack(pixels).to(device)).cpu()
                for image, latent in zip(chunk, latents):
                    cache.write("latents", keys[image], latent.clone(), str(image))
                stats.images_encoded += len(chunk)
            bar.update(len(images[start : start + batch_size]))
    del vae
    _free_memory(device)


def _encode_prompts(prompts, keys, cache, text_encoder_path, device, batch_size, stats, main, should_stop) -> None:
    if not prompts:
        return
    encoder = load_text_encoder(text_encoder_path, dtype=cache.dtype, device=device)
    stats.text_encoder_loaded = True
    with tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", disable=None if main else True) as bar:
        for start in range(0, len(prompts), batch_size):
            if should_stop():
                raise KeyboardInterrupt
            chunk = prompts[start : start + batch_size]
            embeds = encoder.encode(chunk).cpu()
            for prompt, embed in zip(chunk, embeds):
                cache.write("text", keys[prompt], embed.clone(), prompt)
            stats.prompts_encoded += len(chunk)
            bar.update(len(chunk))
    del encoder
    _free_memory(device)


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_dir_for(output_dir: Path, cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else output_dir / "cache"


def encoder_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """Encoder / cache dtype: the reference runs both encoders in bf16 on GPU; fp32 is faster on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]

