"""The encoding cache: each image goes through the frozen VAE once, each prompt through Qwen3 once.

Entries are small safetensors files, one per image (the VAE latent mean, ``(128, R/16, R/16)``)
and one per distinct prompt (``(128, hidden)`` embeddings), named by a hash of everything that
decides their content:

- latents: the image file's bytes, the size (its bucket), the pre-processing, the VAE file, the dtype;
- prompts: the text, the text encoder's weights, config.json and tokenizer files, the dtype.

So a changed image, caption, model file, size or dtype re-encodes exactly the affected
entries, and a run whose entries all exist never loads the encoders. Each entry is written
atomically, so an interrupted encoding keeps what it finished. Each entry also records a
checksum of its tensor; an entry that is damaged (unreadable, wrong shape or dtype, NaN,
checksum mismatch) is reported by name and encoded again. ``encoding.py`` fills the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from aaa_core.checkpoint import file_sha256, save_safetensors, tensor_bytes
from aaa_core.devices import DTYPES, bf16_is_native
from aaa_core.outputs import sweep_temp_files, write_json_atomic
from aaa_core.errors import InputError, OutputError
from aaa_core.geometry import LATENT_CHANNELS, TEXT_TOKENS, latent_size
from aaa_core.text_encoder import encoder_files, load_config

from .pairs import PREPROCESS_VERSION

log = logging.getLogger(__name__)

T = TypeVar("T")
CHECKSUM_KEY = "sha256"  # entry metadata: the SHA-256 of the tensor's bytes


@dataclasses.dataclass
class CacheStats:
    """What filling the cache cost on this process (tests and the log read it)."""

    images_encoded: int = 0
    prompts_encoded: int = 0
    vae_loaded: bool = False
    text_encoder_loaded: bool = False


def content_hash(*parts: object) -> str:
    """The SHA-256 of the parts' text joined by the ASCII unit separator: the cache's keys and fingerprints."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


class FileFacts:
    """Facts about files (their SHA-256, an image's size) remembered by (path, size, mtime) in a JSON memo.

    So a model file is hashed once, and a restart over 100k images neither reads nor opens them
    again just to key the cache. A damaged memo is rebuilt, never trusted.
    """

    def __init__(self, memo_file: Path):
        self.memo_file = memo_file
        try:
            memo = json.loads(memo_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
        self._memo: dict = memo if isinstance(memo, dict) else {}
        self._changed = False

    def get(self, path: Path, name: str, compute: Callable[[Path], T], valid: Callable[[object], bool]) -> T:
        """Fact ``name`` of ``path``: the remembered value if the file is unchanged and it passes ``valid``."""
        stat = path.stat()
        key = str(path.resolve())
        entry = self._memo.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
            entry = self._memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if not valid(entry.get(name)):
            entry[name] = compute(path)
            self._changed = True
        return entry[name]

    def sha256(self, path: Path) -> str:
        return self.get(path, "sha256", file_sha256, lambda value: isinstance(value, str))

    def save(self) -> None:
        """Writes the memo if anything was added (atomically: readers never see half of it)."""
        if self._changed:
            with writing_to_cache(self.memo_file):
                write_json_atomic(self.memo_file, self._memo, indent=1)
            self._changed = False


@contextlib.contextmanager
def writing_to_cache(path: Path) -> Iterator[None]:
    """Turns an OS error while writing ``path`` into one line that says what to do."""
    try:
        yield
    except (OSError, OutputError) as err:
        reason = err.reason if isinstance(err, OutputError) else err.strerror or err
        raise InputError(f"{path}: cannot write to the encoding cache ({reason}); pass a writable --cache-dir") from None


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's raw bytes (any dtype, bfloat16 included)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


class EncodingCache:
    """Entry files under ``root/latents`` and ``root/text``, addressed by content keys.

    ``shapes`` is what every entry of a kind must hold: the check on write and on read.
    """

    def __init__(self, root: Path, vae_path: Path, text_encoder_path: Path, resolution: int, dtype: torch.dtype):
        self.root = root
        self.vae_id = self.model_sha256(vae_path)
        files = encoder_files(text_encoder_path)
        self.text_encoder_id = content_hash(
            self.model_sha256(files.weights),
            f"config:{file_sha256(files.config)}",
            *(f"{file.name}:{file_sha256(file)}" for file in files.tokenizer),
        )
        self.resolution = resolution
        self.dtype = dtype
        self.shapes = {
            "latents": (LATENT_CHANNELS, *latent_size(resolution, resolution)),
            "text": (TEXT_TOKENS, load_config(files.weights.parent).hidden_size),
        }

    def model_sha256(self, path: Path) -> str:
        """A model file's SHA-256, computed once and remembered in the cache (a LoRA run's base, too)."""
        def hash_file(path: Path) -> str:
            log.info("hashing %s (once; identifies the model in the cache keys)", path)
            return file_sha256(path)

        facts = FileFacts(self.root / "model_fingerprints.json")
        sha = facts.get(path, "sha256", hash_file, lambda value: isinstance(value, str))
        facts.save()
        return sha

    def latent_key(self, image_sha: str, size: tuple[int, int] | None = None) -> str:
        """The key of an image's latent at ``size`` (width, height; default: resolution x resolution)."""
        width, height = size or (self.resolution, self.resolution)
        # A square entry keeps the key it had before buckets existed, so those caches stay valid.
        size_part = width if width == height else f"{width}x{height}"
        return content_hash("latent", image_sha, size_part, PREPROCESS_VERSION, self.vae_id, self.dtype)

    def shape(self, kind: str, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """What an entry of ``kind`` holds; latents depend on the image size (width, height)."""
        if kind == "latents" and size is not None:
            return (LATENT_CHANNELS, *latent_size(*size))
        return self.shapes[kind]

    def text_key(self, prompt: str) -> str:
        return content_hash("text", prompt, self.text_encoder_id, self.dtype)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def sweep_temp_files(self) -> list[Path]:
        """Removes the temps that killed writers left among the entries; those of live processes stay,
        so runs sharing the cache never lose each other's writes in progress."""
        folders = [self.root, *(folder for kind in self.shapes for folder in sorted((self.root / kind).glob("??"))),
                   *sorted((self.root / "packed").glob("*"))]  # and the packs' shards
        return [temp for folder in folders for temp in sweep_temp_files(folder)]

    def write(self, kind: str, key: str, tensor: torch.Tensor, source: str, size: tuple[int, int] | None = None) -> None:
        """Stores a fresh encoding with its checksum; refuses one that could never be read back."""
        problem = self._problem(tensor, self.shape(kind, size))
        if problem:
            raise InputError(
                f"encoding {_describe(kind, source)} gave a tensor that {problem}; "
                "check the model file, or try --encoder-dtype fp32"
            )
        metadata = {"source": source[:1000], CHECKSUM_KEY: tensor_sha256(tensor)}
        with writing_to_cache(self.path(kind, key)):
            save_safetensors({kind: tensor}, self.path(kind, key), metadata)

    def load(
        self, kind: str, key: str, source: str, report: bool = True, size: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """The entry's tensor; ``None`` if it is missing or damaged (then warned about and removed)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        tensor, problem = self._read(kind, path, self.shape(kind, size))
        if problem is None:
            return tensor
        if report:
            log.warning("cache entry %s (%s) %s; encoding it again", path, _describe(kind, source), problem)
        with contextlib.suppress(OSError):  # so no damaged entry remains even if the encoding fails
            path.unlink()
        return None

    def _read(self, kind: str, path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, str | None]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names, metadata = list(handle.keys()), handle.metadata() or {}
                if names != [kind]:
                    return None, f"holds tensors {names}, expected one named '{kind}'"
                tensor = handle.get_tensor(kind).clone()  # its own memory, not a view of the mapped file
        except (SafetensorError, OSError, ValueError) as err:
            return None, f"is not a readable safetensors file ({err})"
        problem = self._problem(tensor, shape)
        if problem is None and metadata.get(CHECKSUM_KEY) != tensor_sha256(tensor):
            problem = "does not match its checksum" if CHECKSUM_KEY in metadata else "has no checksum"
        return (tensor, None) if problem is None else (None, problem)

    def _problem(self, tensor: torch.Tensor, shape: tuple[int, ...]) -> str | None:
        """What is wrong with a tensor for an entry of ``shape``, or ``None``."""
        if tuple(tensor.shape) != shape:
            return f"has shape {tuple(tensor.shape)}, expected {shape}"
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


def cache_dir_for(output_dir: Path, cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else output_dir / "cache"


def encoder_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """Encoder / cache dtype: bf16 as the reference runs both encoders, where the hardware computes it
    (GPUs, CPUs with AVX512-BF16 or AMX); fp32 on other CPUs, where bf16 is emulated and slower."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_native(device.type) else torch.float32
    return DTYPES[name]

