"""The packed data set: encoded samples in safetensors shards on disk, read row by row as batches need them.

Used when the encoded data set is too large to hold in memory (``--data-loading``). A pack is
written once, after the encoding pass, into ``CACHE/packed/<pack id>/``; the id covers every
sample's cache keys and bucket, so a run over the same data reuses it without reading the
per-entry cache at all.

- ``shard-BUCKET-NNNNN.safetensors`` holds up to ``rows`` consecutive samples of one bucket:
  ``latents (n, 128, h, w)``, ``text (n, 128, text_dim)`` and ``crc32 (n, 2)`` (a checksum of each
  row of both, checked on every read).
- ``index.json``, written last (a pack without it is not a pack): the buckets, the shards with
  their row counts, and the samples left out as unreadable, so a reuse reports them again.

Why plain safetensors files read with ``os.pread``: the format is the cache's and the
checkpoints', readable by any safetensors tool; a row is one read at an offset from the file's
header, so a process holds only the batches in flight (no memory-mapped pages that add up as a
long run goes through the data) and DataLoader workers each use their own file handles. A
streaming library (MosaicML ``streaming``, ``webdataset``) would add a dependency and bring its
own shuffle, while the order must stay ours: a pure function of (seed, step), so a resumed run
reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import torch

from aaa_core.checkpoint import save_safetensors, tensor_bytes
from aaa_core.errors import InputError
from aaa_core.geometry import DOWNSCALE
from aaa_core.outputs import write_json_atomic

INDEX_FILE = "index.json"
PACK_FORMAT = 1
SHARD_BYTES = 256 << 20  # rows per shard: about this many bytes, so a shard is written from memory in one go
TENSORS = ("latents", "text")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard file: its bucket (an index into the pack's buckets) and how many samples it holds."""

    file: str
    bucket: int
    rows: int


@dataclasses.dataclass(frozen=True)
class PackIndex:
    """What ``index.json`` records."""

    buckets: list[tuple[int, int]]  # (width, height) in pixels
    shards: list[ShardInfo]
    skipped: list[tuple[str, str]]  # (image, reason) of the samples left out

    def bucket_ids(self) -> torch.Tensor:
        """``(samples,)`` the bucket of each packed sample, in pack order (the order the batch order numbers)."""
        return torch.cat([torch.full((s.rows,), s.bucket, dtype=torch.long) for s in self.shards])


def row_checksum(latent: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(2,)`` int64: the CRC-32 of a sample's latent bytes and of its prompt bytes."""
    return torch.tensor([zlib.crc32(tensor_bytes(latent)), zlib.crc32(tensor_bytes(text))], dtype=torch.long)


def rows_per_shard(bytes_per_row: int) -> int:
    return max(1, SHARD_BYTES // max(1, bytes_per_row))


def shard_name(bucket: tuple[int, int], number: int) -> str:
    return f"shard-{bucket[0]}x{bucket[1]}-{number:05d}.safetensors"


def write_shard(path: Path, latents: Sequence[torch.Tensor], texts: Sequence[torch.Tensor]) -> None:
    """Writes one shard atomically from per-sample tensors of one bucket."""
    checksums = torch.stack([row_checksum(latent, text) for latent, text in zip(latents, texts)])
    save_safetensors({"latents": torch.stack(list(latents)), "text": torch.stack(list(texts)), "crc32": checksums}, path,
                     {"aaa_pack_format": str(PACK_FORMAT)})


def write_index(folder: Path, index: PackIndex) -> None:
    """Marks the pack complete; called once every shard is on disk."""
    record = {
        "format": PACK_FORMAT,
        "buckets": [list(b) for b in index.buckets],
        "shards": [dataclasses.asdict(s) for s in index.shards],
        "skipped": [list(s) for s in index.skipped],
    }
    write_json_atomic(folder / INDEX_FILE, record)


def read_index(folder: Path) -> PackIndex | None:
    """The pack's index, or ``None`` if the pack is incomplete, from another format or damaged (then it is rebuilt)."""
    try:
        record = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        if record.get("format") != PACK_FORMAT:
            return None
        index = PackIndex(
            buckets=[(int(w), int(h)) for w, h in record["buckets"]],
            shards=[ShardInfo(str(s["file"]), int(s["bucket"]), int(s["rows"])) for s in record["shards"]],
            skipped=[(str(name), str(reason)) for name, reason in record["skipped"]],
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not index.shards or any(not 0 <= s.bucket < len(index.buckets) or s.rows < 1 for s in index.shards):
        return None
    return index


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one tensor's rows sit in a shard file: byte offset of row 0, bytes per row, dtype, row shape."""

    offset: int
    row_bytes: int
    dtype: torch.dtype
    row_shape: tuple[int, ...]


class ShardReader:
    """Reads samples of a pack by their pack number; safe to use in DataLoader workers (files opened lazily)."""

    def __init__(self, folder: Path, index: PackIndex, latent_channels: int, text_shape: tuple[int, int], dtype: torch.dtype):
        self.folder = folder
        self.index = index
        self.dtype = dtype
        expected = {
            b: {"latents": (latent_channels, h // DOWNSCALE, w // DOWNSCALE), "text": tuple(text_shape), "crc32": (2,)}
            for b, (w, h) in enumerate(index.buckets)
        }
        # Every header is read and checked once, up front: a damaged shard is named before training starts.
        self.layouts = [self._read_layout(folder / s.file, s.rows, expected[s.bucket]) for s in index.shards]
        starts = torch.tensor([0] + [s.rows for s in index.shards]).cumsum(0)
        self._shard_starts = starts[:-1]
        self.num_samples = int(starts[-1])
        self._files: dict[int, int] = {}  # shard -> file descriptor, per process

    def __len__(self) -> int:
        return self.num_samples

    def _read_layout(self, path: Path, rows: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, _Layout]:
        def bad(reason: str) -> InputError:
            return InputError(f"{path}: damaged training data shard ({reason}); delete the folder {path.parent} "
                              "and run again: it is packed again from the encoding cache")
        try:
            with open(path, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                if header_size > 100 << 20:
                    raise bad("header too large")
                header = json.loads(handle.read(header_size))
            file_size = path.stat().st_size
        except FileNotFoundError:
            raise bad("file missing") from None
        except (OSError, ValueError, struct.error) as err:
            raise bad(f"header unreadable: {err}") from None
        layouts = {}
        for name, row_shape in shapes.items():
            entry = header.get(name) if isinstance(header, dict) else None
            if not isinstance(entry, dict):
                raise bad(f"no tensor '{name}'")
            dtype = torch.long if name == "crc32" else self.dtype
            if _DTYPES.get(entry.get("dtype")) != dtype or list(entry.get("shape", [])) != [rows, *row_shape]:
                raise bad(f"'{name}' is {entry.get('dtype')} {entry.get('shape')}, expected {dtype} {[rows, *row_shape]}")
            begin, end = entry["data_offsets"]
            row_bytes = (end - begin) // rows
            if 8 + header_size + end > file_size:
                raise bad(f"cut short at {file_size} bytes")
            layouts[name] = _Layout(8 + header_size + begin, row_bytes, dtype, row_shape)
        return layouts

    def _fd(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.index.shards[shard].file, os.O_RDONLY)
        return self._files[shard]

    def _row(self, shard: int, name: str, row: int) -> torch.Tensor:
        layout = self.layouts[shard][name]
        data = os.pread(self._fd(shard), layout.row_bytes, layout.offset + row * layout.row_bytes)
        if len(data) != layout.row_bytes:
            raise InputError(f"{self.folder / self.index.shards[shard].file}: cut short while reading row {row}")
        return torch.frombuffer(bytearray(data), dtype=layout.dtype).view(layout.row_shape)

    def read(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents (B,128,h,w), text (B,128,D))`` of pack samples that share a bucket, each row checked."""
        shards = torch.searchsorted(self._shard_starts, samples, right=True) - 1
        latents, texts = [], []
        for sample, shard in zip(samples.tolist(), shards.tolist()):
            row = sample - int(self._shard_starts[shard])
            latent, text = self._row(shard, "latents", row), self._row(shard, "text", row)
            if not torch.equal(row_checksum(latent, text), self._row(shard, "crc32", row)):
                raise InputError(f"{self.folder / self.index.shards[shard].file}: row {row} does not match its checksum "
                                 f"(disk damage?); delete the folder {self.folder} and run again with --resume")
            latents.append(latent)
            texts.append(text)
        return torch.stack(latents), torch.stack(texts)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:  # DataLoader workers get the layout, not the parent's file descriptors
        return {**self.__dict__, "_files": {}}


def chunks(count: int, size: int) -> Iterator[range]:
    """``range``s of at most ``size`` covering ``0..count``."""
    for start in range(0, count, size):
        yield range(start, min(count, start + size))
