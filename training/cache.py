"""The encoding cache: each image goes through the frozen VAE once, each prompt through Qwen3 once.

Entries are small safetensors files, one per image (the VAE latent mean, ``(128, R/16, R/16)``)
and one per distinct prompt (``(128, hidden)`` embeddings), named by a hash of everything that
decides their content:

- latents: the image file's bytes, the resolution, the pre-processing, the VAE file, the dtype;
- prompts: the text, the text encoder's weights, config.json and tokenizer files, the dtype.

So a changed image, caption, model file, size or dtype re-encodes exactly the affected
entries, and a run whose entries all exist never loads the encoders. Each entry is written
atomically, so an interrupted encoding keeps what it finished. Each entry also records a
checksum of its tensor; an entry that is damaged (unreadable, wrong shape or dtype, NaN,
checksum mismatch) is reported by name and encoded again. With several processes each encodes
its share of the missing entries; then every process reads them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from aaa_core.checkpoint import save_safetensors
from aaa_core.outputs import atomic_output, sweep_temp_files
from aaa_core.errors import InputError, OutputError
from aaa_core.sampling import LATENT_CHANNELS, latent_size
from aaa_core.text_encoder import MAX_TOKENS, encoder_files, load_config, load_text_encoder
from aaa_core.vae import load_vae

from .data import PREPROCESS_VERSION, Sample, Skipped, load_image

log = logging.getLogger(__name__)

CHECKSUM_KEY = "sha256"  # entry metadata: the SHA-256 of the tensor's bytes


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
    stat = path.stat()
    key = str(path.resolve())
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}  # a damaged memo is rebuilt, never trusted
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        if isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    log.info("hashing %s (once; identifies the model in the cache keys)", path)
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    with _writing_to_cache(memo_file), atomic_output(memo_file) as tmp:
        tmp.write_text(json.dumps(memo, indent=1), encoding="utf-8")
    return memo[key]["sha256"]


@contextlib.contextmanager
def _writing_to_cache(path: Path) -> Iterator[None]:
    """Turns an OS error while writing ``path`` into one line that says what to do."""
    try:
        yield
    except (OSError, OutputError) as err:
        reason = err.reason if isinstance(err, OutputError) else err.strerror or err
        raise InputError(f"{path}: cannot write to the encoding cache ({reason}); pass a writable --cache-dir") from None


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's raw bytes (any dtype, bfloat16 included)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class EncodingCache:
    """Entry files under ``root/latents`` and ``root/text``, addressed by content keys.

    ``shapes`` is what every entry of a kind must hold: the check on write and on read.
    """

    def __init__(self, root: Path, vae_path: Path, text_encoder_path: Path, resolution: int, dtype: torch.dtype):
        self.root = root
        memo = root / "model_fingerprints.json"
        self.vae_id = model_fingerprint(vae_path, memo)
        files = encoder_files(text_encoder_path)
        self.text_encoder_id = _hash(
            model_fingerprint(files.weights, memo),
            f"config:{file_sha256(files.config)}",
            *(f"{file.name}:{file_sha256(file)}" for file in files.tokenizer),
        )
        self.resolution = resolution
        self.dtype = dtype
        self.shapes = {
            "latents": (LATENT_CHANNELS, *latent_size(resolution, resolution)),
            "text": (MAX_TOKENS, load_config(files.weights.parent).hidden_size),
        }

    def latent_key(self, image_sha: str) -> str:
        return _hash("latent", image_sha, self.resolution, PREPROCESS_VERSION, self.vae_id, self.dtype)

    def text_key(self, prompt: str) -> str:
        return _hash("text", prompt, self.text_encoder_id, self.dtype)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def sweep_temp_files(self) -> list[Path]:
        """Removes the temps that killed writers left among the entries; those of live processes stay,
        so runs sharing the cache never lose each other's writes in progress."""
        folders = [self.root, *(folder for kind in self.shapes for folder in sorted((self.root / kind).glob("??")))]
        return [temp for folder in folders for temp in sweep_temp_files(folder)]

    def write(self, kind: str, key: str, tensor: torch.Tensor, source: str) -> None:
        """Stores a fresh encoding with its checksum; refuses one that could never be read back."""
        problem = self._problem(kind, tensor)
        if problem:
            raise InputError(
                f"encoding {_describe(kind, source)} gave a tensor that {problem}; "
                "check the model file, or try --encoder-dtype fp32"
            )
        metadata = {"source": source[:1000], CHECKSUM_KEY: tensor_sha256(tensor)}
        with _writing_to_cache(self.path(kind, key)):
            save_safetensors({kind: tensor}, self.path(kind, key), metadata)

    def load(self, kind: str, key: str, source: str, report: bool = True) -> torch.Tensor | None:
        """The entry's tensor; ``None`` if it is missing or damaged (then warned about and removed)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        tensor, problem = self._read(kind, path)
        if problem is None:
            return tensor
        if report:
            log.warning("cache entry %s (%s) %s; encoding it again", path, _describe(kind, source), problem)
        with contextlib.suppress(OSError):  # so no damaged entry remains even if the encoding fails
            path.unlink()
        return None

    def _read(self, kind: str, path: Path) -> tuple[torch.Tensor | None, str | None]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names, metadata = list(handle.keys()), handle.metadata() or {}
                if names != [kind]:
                    return None, f"holds tensors {names}, expected one named '{kind}'"
                tensor = handle.get_tensor(kind).clone()  # its own memory, not a view of the mapped file
        except (SafetensorError, OSError, ValueError) as err:
            return None, f"is not a readable safetensors file ({err})"
        problem = self._problem(kind, tensor)
        if problem is None and metadata.get(CHECKSUM_KEY) != tensor_sha256(tensor):
            problem = "does not match its checksum" if CHECKSUM_KEY in metadata else "has no checksum"
        return (tensor, None) if problem is None else (None, problem)

    def _problem(self, kind: str, tensor: torch.Tensor) -> str | None:
        """What is wrong with a tensor for an entry of ``kind``, or ``None``."""
        if tuple(tensor.shape) != self.shapes[kind]:
            return f"has shape {tuple(tensor.shape)}, expected {self.shapes[kind]}"
        if tensor.dtype != self.dtype:
            return f"has dtype {tensor.dtype}, expected {self.dtype}"
        if not torch.isfinite(tensor).all():
            return "holds NaN or infinite values"
        return None


def _describe(kind: str, source: str) -> str:
    """Names an entry's source in messages: the image file, or the start of the prompt."""
    if kind == "latents":
        return f"image {source}"
    return f"prompt {source[:60]!r}" + ("..." if len(source) > 60 else "")


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
    """Encodes what the cache lacks or holds damaged (this process's share), then reads the whole data set.

    Returns the encoded data and the samples whose image turned out to be unreadable.
    """
    stats = CacheStats()
    main = rank == 0
    if main:
        for left_over in cache.sweep_temp_files():
            log.info("deleted %s (left by an interrupted encoding)", left_over)
    image_sha = {s.image: file_sha256(s.image) for s in samples}
    latent_keys = {image: cache.latent_key(sha) for image, sha in image_sha.items()}
    prompts = list(dict.fromkeys([s.caption for s in samples] + list(extra_prompts)))
    text_keys = {prompt: cache.text_key(prompt) for prompt in prompts}

    # Every entry is read and checked once; None marks one to encode (missing or damaged).
    latents = {key: cache.load("latents", key, str(image), report=main) for image, key in latent_keys.items()}
    texts = {key: cache.load("text", key, prompt, report=main) for prompt, key in text_keys.items()}
    missing_images = [image for image, key in latent_keys.items() if latents[key] is None]
    missing_prompts = [prompt for prompt, key in text_keys.items() if texts[key] is None]
    if main:
        log.info(
            "cache %s: %d of %d images and %d of %d prompts to encode",
            cache.root, len(missing_images), len(latent_keys), len(missing_prompts), len(text_keys),
        )
    barrier()  # every process has checked the entries before any is rewritten
    failures = _encode_images(missing_images[rank::world_size], latent_keys, cache, vae_path, device, batch_size, stats, main, should_stop)
    _encode_prompts(missing_prompts[rank::world_size], text_keys, cache, text_encoder_path, device, batch_size, stats, main, should_stop)
    barrier()  # every share is on disk before anyone reads
    for image in missing_images:  # written by any process; still None if the image was unreadable
        latents[latent_keys[image]] = cache.load("latents", latent_keys[image], str(image), report=main)
    for prompt in missing_prompts:
        texts[text_keys[prompt]] = cache.load("text", text_keys[prompt], prompt, report=main)
    if any(texts[key] is None for key in text_keys.values()):
        raise InputError(f"cache {cache.root}: a prompt embedding is missing after encoding; see the messages above")

    skipped, used = [], []
    for sample in samples:
        if latents[latent_keys[sample.image]] is not None:
            used.append(sample)
        else:
            skipped.append(Skipped(sample.image.name, failures.get(sample.image, "unreadable image")))
    if not used:
        raise InputError("no image could be read; see the messages above")

    image_order = list(dict.fromkeys(latent_keys[s.image] for s in used))
    text_order = list(dict.fromkeys(text_keys[s.caption] for s in used))
    image_slot = {key: i for i, key in enumerate(image_order)}
    text_slot = {key: i for i, key in enumerate(text_order)}
    data = EncodedData(
        latents=torch.stack([latents[key] for key in image_order]),
        text=torch.stack([texts[key] for key in text_order]),
        image_index=torch.tensor([image_slot[latent_keys[s.image]] for s in used]),
        text_index=torch.tensor([text_slot[text_keys[s.caption]] for s in used]),
        captions=[s.caption for s in used],
        extra_prompts={prompt: texts[text_keys[prompt]] for prompt in extra_prompts},
        fingerprint=_hash(*(f"{latent_keys[s.image]}:{text_keys[s.caption]}" for s in used)),
        stats=stats,
    )
    return data, skipped


# Said instead of the trainer's "interrupted without saving": nothing but cache entries exists yet.
STOPPED_WHILE_ENCODING = (
    "stopped while filling the encoding cache; the entries encoded so far are kept: run the same command again to go on"
)


def _encode_images(images, keys, cache, vae_path, device, batch_size, stats, main, should_stop) -> dict[Path, str]:
    """Encodes and stores ``images``; returns why each unreadable one was left out."""
    vae, failures = None, {}
    with tqdm(total=len(images), desc="encoding images", unit="img", disable=None if main else True) as bar:
        for start in range(0, len(images), batch_size):
            if should_stop():
                raise KeyboardInterrupt(STOPPED_WHILE_ENCODING)
            chunk, pixels = [], []
            for image in images[start : start + batch_size]:
                try:
                    pixels.append(load_image(image, cache.resolution, cache.resolution, cache.dtype))
                    chunk.append(image)
                except InputError as err:  # counted as skipped once all shares are done
                    failures[image] = str(err).removeprefix(f"{image}: ")
                    if not main:  # the main process reports its own failures in the skip summary
                        log.warning("skipped %s: %s", image.name, failures[image])
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
    return failures


def _encode_prompts(prompts, keys, cache, text_encoder_path, device, batch_size, stats, main, should_stop) -> None:
    if not prompts:
        return
    encoder = load_text_encoder(text_encoder_path, dtype=cache.dtype, device=device)
    stats.text_encoder_loaded = True
    with tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", disable=None if main else True) as bar:
        for start in range(0, len(prompts), batch_size):
            if should_stop():
                raise KeyboardInterrupt(STOPPED_WHILE_ENCODING)
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

