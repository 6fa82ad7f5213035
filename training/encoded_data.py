"""The encoded training set as the loop sees it: micro-batches of (latents, prompt states), one bucket each.

``load_training_data`` keys every sample in the encoding cache, fills what the cache lacks
(``encoding.py``) and hands the loop one of two holders, chosen by ``--data-loading``:

- ``InMemoryData``: every latent and prompt embedding stacked in memory, on the GPU when it fits
  there; a batch is two index operations. For data sets that fit (the 151 Pokemon take 20 MB).
- ``PackedData``: the samples packed into shards on disk once (``shards.py``) and read by
  DataLoader workers, a batch at a time; memory stays flat however large the data set.

``auto`` picks memory when the whole set takes at most a quarter of the machine's available
memory (per process), else the packed shards. Both number the samples the same way (grouped by
bucket, in data-set order within a bucket), so the batch order, and so the training, is the same
with either: a run may switch between them on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
from itertools import accumulate, groupby
from pathlib import Path
from typing import Callable, Iterator

import torch

from aaa_core.errors import AAAError, InputError

from .batches import BatchOrder
from .buckets import Bucket, assign_bucket, image_size
from .cache import CacheStats, EncodingCache, FileFacts, content_hash, writing_to_cache
from .encoding import FilledCache, LatentEntry, fill_cache
from .memory import available_memory, processes_on_this_machine
from .pairs import Sample, Skipped
from .processes import Processes
from .shards import (
    INDEX_FILE, PackIndex, ShardInfo, ShardReader, chunks, read_index, rows_per_shard, rows_source, shard_name, write_index,
    write_shard,
)

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.25  # auto holds the data in memory if it takes at most this share of the available memory


# --------------------------------------------------------------------------------------
# Keys: which cache entries each sample needs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataPlan:
    """Every sample with its bucket and cache keys, in the order the batch order numbers them."""

    samples: list[Sample]  # grouped by bucket, data-set order within each
    buckets: list[tuple[int, int]]  # (width, height) in pixels
    bucket_of: list[int]
    latent_keys: list[str]
    text_keys: list[str]
    extra_prompts: dict[str, str]  # validation and negative prompts -> key
    unreadable: list[Skipped] = dataclasses.field(default_factory=list)  # left out: image header unreadable

    def latent_entries(self) -> list[LatentEntry]:
        return [LatentEntry(s.image, key, self.buckets[b]) for s, key, b in zip(self.samples, self.latent_keys, self.bucket_of)]

    def prompts(self) -> dict[str, str]:
        """Every prompt the run needs (captions and extra prompts) -> its key."""
        return {**{s.caption: key for s, key in zip(self.samples, self.text_keys)}, **self.extra_prompts}

    def fingerprint(self, used: list[int]) -> str:
        """Changes when any used sample's inputs change; a resumed run checks it."""
        return content_hash(*(f"{self.latent_keys[i]}:{self.text_keys[i]}" for i in used))

    def pack_id(self) -> str:
        """Names the pack of exactly these samples, buckets and keys (unreadable images included: the index lists them)."""
        return content_hash("pack", self.buckets, *(f"{b}:{l}:{t}" for b, l, t in zip(self.bucket_of, self.latent_keys, self.text_keys)))[:32]

    def memory_bytes(self, cache: EncodingCache) -> int:
        """What holding every distinct latent and prompt embedding in memory takes."""
        element = torch.empty((), dtype=cache.dtype).element_size()
        latents = {key: cache.shape("latents", self.buckets[b]) for key, b in zip(self.latent_keys, self.bucket_of)}
        texts = len(set(self.text_keys)) * math.prod(cache.shape("text"))
        return element * (sum(math.prod(shape) for shape in latents.values()) + texts)


def plan_data(
    samples: list[Sample], extra_prompts: list[str], cache: EncodingCache, buckets: list[Bucket],
    processes: Processes = Processes(),
) -> DataPlan:
    """Keys each sample; the main process hashes (and measures) new images first, the others then reuse its memo.

    With several buckets each image's size is read from its header; one whose header is
    unreadable is left out here (``DataPlan.unreadable``), as the encoding pass would.
    """
    def facts_of_all() -> tuple[list[str], list[int | None], dict[int, str]]:
        facts = FileFacts(cache.root / "image_facts.json")
        shas = [facts.sha256(s.image) for s in samples]
        chosen: list[int | None] = [0] * len(samples)  # one bucket: no image needs opening
        failures: dict[int, str] = {}
        if len(buckets) > 1:
            measure = lambda path: list(image_size(path))  # noqa: E731  (as JSON gives it back)
            for i, sample in enumerate(samples):
                try:
                    chosen[i] = assign_bucket(*facts.get(sample.image, "pixels", measure, _is_size), buckets)
                except InputError as err:
                    chosen[i], failures[i] = None, str(err).removeprefix(f"{sample.image}: ")
        if processes.is_main:
            facts.save()
        return shas, chosen, failures

    if processes.is_main:
        shas, chosen, failures = facts_of_all()
    processes.barrier()
    if not processes.is_main:
        shas, chosen, failures = facts_of_all()
    order = sorted((i for i in range(len(samples)) if chosen[i] is not None), key=lambda i: chosen[i])  # stable
    sizes = [(bucket.width, bucket.height) for bucket in buckets]
    return DataPlan(
        samples=[samples[i] for i in order],
        buckets=sizes,
        bucket_of=[chosen[i] for i in order],
        latent_keys=[cache.latent_key(shas[i], sizes[chosen[i]]) for i in order],
        text_keys=[cache.text_key(samples[i].caption) for i in order],
        extra_prompts={prompt: cache.text_key(prompt) for prompt in extra_prompts},
        unreadable=[Skipped(samples[i].image.name, reason) for i, reason in failures.items()],
    )


def _is_size(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(side, int) and side > 0 for side in value)


# --------------------------------------------------------------------------------------
# The two holders
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingData:
    """What both holders share: sample ``i`` belongs to bucket ``bucket_ids[i]``."""

    buckets: list[tuple[int, int]]
    bucket_ids: torch.Tensor  # (samples,) int64
    extra_prompts: dict[str, torch.Tensor]  # validation and negative prompts -> (128, text_dim)
    text_shape: tuple[int, int]
    fingerprint: str
    stats: CacheStats

    def __len__(self) -> int:
        return len(self.bucket_ids)

    def bucket_counts(self) -> str:
        counts = torch.bincount(self.bucket_ids.cpu(), minlength=len(self.buckets)).tolist()
        return ", ".join(f"{w}x{h}: {n}" for (w, h), n in zip(self.buckets, counts) if n)


@dataclasses.dataclass
class InMemoryData(TrainingData):
    """Sample ``i``'s latent is ``latents[bucket][image_index[i]]``, its prompt ``text[text_index[i]]``."""

    latents: list[torch.Tensor]  # per bucket: (images, 128, h, w)
    text: torch.Tensor  # (prompts, 128, text_dim)
    image_index: torch.Tensor
    text_index: torch.Tensor

    def to(self, device: torch.device) -> "InMemoryData":
        return dataclasses.replace(
            self, latents=[latents.to(device) for latents in self.latents], text=self.text.to(device),
            bucket_ids=self.bucket_ids.to(device), image_index=self.image_index.to(device), text_index=self.text_index.to(device),
        )

    def batches(self, order: BatchOrder, first: int, last: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches ``first..last-1`` of this process."""
        for micro_step in range(first, last):
            batch = order.indices(micro_step)
            yield self.latents[order.bucket(micro_step)][self.image_index[batch]], self.text[self.text_index[batch]]

    def describe(self) -> str:
        size = sum(t.numel() * t.element_size() for t in (*self.latents, self.text)) / 2**20
        return f"held in memory on {self.text.device} ({size:,.0f} MB)"


@dataclasses.dataclass
class PackedData(TrainingData):
    """Samples read from the pack's shards by ``workers`` DataLoader processes (0: by the training process)."""

    reader: ShardReader
    workers: int
    pin_memory: bool

    def batches(self, order: BatchOrder, first: int, last: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            _MicroBatches(self.reader, order), batch_size=None, sampler=range(first, last), num_workers=self.workers,
            pin_memory=self.pin_memory, prefetch_factor=4 if self.workers else None, worker_init_fn=_leave_stop_signals_to_trainer,
        )
        batches = iter(loader)
        try:
            for item in batches:
                if isinstance(item, AAAError):  # a damaged shard, named in one line (see _MicroBatches)
                    raise item
                yield item
        finally:
            # The workers ignore SIGTERM (below), so they must be told to end: an exception raised inside
            # the loader keeps it referenced past this point, and at exit Python would wait for them forever.
            shutdown = getattr(batches, "_shutdown_workers", None)  # what the loader's own __del__ calls
            if shutdown is not None:
                shutdown()
            self.reader.close()  # the shard files it opened itself (with no workers); it reopens them on demand

    def describe(self) -> str:
        return (f"read from {len(self.reader.index.shards)} shard(s) in {self.reader.folder} by "
                f"{self.workers or 'no'} worker process(es)")


def _leave_stop_signals_to_trainer(worker_id: int) -> None:
    """A terminal's Ctrl-C (and a scheduler's SIGTERM) reach the whole process group: the workers must
    keep reading while the training process finishes its step and saves; they end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _MicroBatches(torch.utils.data.Dataset):
    """Item ``m`` is this process's micro-batch ``m``: the order picks the samples, the reader reads them."""

    def __init__(self, reader: ShardReader, order: BatchOrder):
        self.reader, self.order = reader, order

    def __getitem__(self, micro_step: int) -> "tuple[torch.Tensor, torch.Tensor] | AAAError":
        # Returned, not raised: a DataLoader re-raises a worker's exception with the worker's traceback in its message.
        try:
            return self.reader.read(self.order.indices(micro_step))
        except AAAError as err:
            return err


# --------------------------------------------------------------------------------------
# Building them
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loading:
    """How the run reaches the encoded data (everything ``load_training_data`` needs besides the plan)."""

    mode: str  # one of config.LOADINGS
    device: torch.device
    on_device: bool  # in memory: move to the GPU when it fits there
    workers: int
    encode_batch_size: int
    processes: Processes = Processes()


def load_training_data(
    plan: DataPlan, cache: EncodingCache, vae_path: Path, text_encoder_path: Path, how: Loading,
) -> tuple[TrainingData, list[Skipped]]:
    """Fills the cache and returns the data set in the holder ``how.mode`` picks, with the images left out as unreadable."""
    mode = how.mode
    if mode == "auto":
        needed, available = plan.memory_bytes(cache), available_memory() // processes_on_this_machine()
        mode = "memory" if needed <= MEMORY_FRACTION * available else "shards"
        log.info("data: %s (the encoded set takes %.1f GB, %.1f GB available per process)",
                 "held in memory" if mode == "memory" else "packed into shards on disk", needed / 1e9, available / 1e9)
    fill = functools.partial(  # fill(entries, prompts, keep=...): the same pass for either holder
        fill_cache, cache=cache, vae_path=vae_path, text_encoder_path=text_encoder_path, device=how.device,
        batch_size=how.encode_batch_size, processes=how.processes)
    if mode == "memory":
        data, skipped = _in_memory(plan, fill(plan.latent_entries(), plan.prompts(), keep=True), cache, how)
    else:
        data, skipped = _packed(plan, fill, cache, how)
    return data, plan.unreadable + skipped


def _split(plan: DataPlan, filled: FilledCache) -> tuple[list[int], list[tuple[str, str]]]:
    """The samples whose latent exists, and (image, reason) of those left out as unreadable."""
    used = [i for i, key in enumerate(plan.latent_keys) if key in filled.present]
    left_out = [(str(plan.samples[i].image), filled.failures.get(plan.samples[i].image, "unreadable image"))
                for i, key in enumerate(plan.latent_keys) if key not in filled.present]
    if not used:
        raise InputError("no image could be read; see the messages above")
    return used, left_out


def _as_skipped(left_out: list[tuple[str, str]]) -> list[Skipped]:
    return [Skipped(Path(image).name, reason) for image, reason in left_out]


def _in_memory(plan: DataPlan, filled: FilledCache, cache: EncodingCache, how: Loading) -> tuple[InMemoryData, list[Skipped]]:
    used, left_out = _split(plan, filled)
    image_rows: dict[str, int] = {}
    latents = []
    for bucket in range(len(plan.buckets)):
        keys = list(dict.fromkeys(plan.latent_keys[i] for i in used if plan.bucket_of[i] == bucket))
        image_rows.update({key: row for row, key in enumerate(keys)})
        latents.append(torch.stack([filled.latents[key] for key in keys]) if keys
                       else torch.empty(0, *cache.shape("latents", plan.buckets[bucket]), dtype=cache.dtype))
    text_keys = list(dict.fromkeys(plan.text_keys[i] for i in used))
    text_rows = {key: row for row, key in enumerate(text_keys)}
    data = InMemoryData(
        buckets=plan.buckets,
        bucket_ids=torch.tensor([plan.bucket_of[i] for i in used]),
        extra_prompts={prompt: filled.texts[key] for prompt, key in plan.extra_prompts.items()},
        text_shape=cache.shape("text"),
        fingerprint=plan.fingerprint(used),
        stats=filled.stats,
        latents=latents,
        text=torch.stack([filled.texts[key] for key in text_keys]),
        image_index=torch.tensor([image_rows[plan.latent_keys[i]] for i in used]),
        text_index=torch.tensor([text_rows[plan.text_keys[i]] for i in used]),
    )
    if how.on_device and how.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(how.device)
        if plan.memory_bytes(cache) <= MEMORY_FRACTION * free:
            data = data.to(how.device)
        else:
            log.info("data: kept in host memory (it would take more than a quarter of the free GPU memory)")
    return data, _as_skipped(left_out)


def _packed(plan: DataPlan, fill: Callable[..., FilledCache], cache: EncodingCache, how: Loading) -> tuple[PackedData, list[Skipped]]:
    folder = cache.root / "packed" / plan.pack_id()
    index = read_index(folder)
    if index is None:  # packed once; later runs over the same data read neither the entries nor the encoders
        filled = fill(plan.latent_entries(), plan.prompts(), keep=False, keep_prompts=set(plan.extra_prompts.values()))
        _write_pack(plan, *_split(plan, filled), cache, folder, how)
        index = read_index(folder)
        if index is None:
            raise InputError(f"{folder}: the packed data set could not be read back after writing it; see the messages above")
    else:
        filled = fill([], plan.extra_prompts, keep=True)  # the sample grids' prompts alone (a few)
    left_out = {image for image, _ in index.skipped}
    used = [i for i, s in enumerate(plan.samples) if str(s.image) not in left_out]
    _check_pack_source(plan, used, index, folder)
    reader = ShardReader(folder, index, cache.shape("latents")[0], cache.shape("text"), cache.dtype)
    data = PackedData(
        buckets=index.buckets, bucket_ids=index.bucket_ids(),
        extra_prompts={prompt: filled.texts[key] for prompt, key in plan.extra_prompts.items()},
        text_shape=cache.shape("text"), fingerprint=plan.fingerprint(used), stats=filled.stats,
        reader=reader, workers=how.workers, pin_memory=how.device.type == "cuda",
    )
    return data, _as_skipped(index.skipped)


def _shard_source(plan: DataPlan, members: list[int]) -> str:
    return rows_source([plan.latent_keys[i] for i in members], [plan.text_keys[i] for i in members])


def _check_pack_source(plan: DataPlan, used: list[int], index: PackIndex, folder: Path) -> None:
    """The index must describe exactly this plan's samples, shard by shard (each shard then checks its own record)."""
    starts = [0, *accumulate(s.rows for s in index.shards)]
    expected = [_shard_source(plan, used[a:b]) for a, b in zip(starts, starts[1:])]
    if index.pack != plan.pack_id() or starts[-1] != len(used) or [s.source for s in index.shards] != expected:
        raise InputError(f"{folder / INDEX_FILE}: describes other samples than this data set's; delete the folder "
                         f"{folder} and run again: it is packed again from the encoding cache")


def _write_pack(plan: DataPlan, used: list[int], left_out: list[tuple[str, str]], cache: EncodingCache, folder: Path,
                how: Loading) -> None:
    """Writes the shards (process ``r`` writes every ``world``-th one), then the index that marks the pack complete."""
    row_bytes = max(math.prod(cache.shape("latents", b)) for b in plan.buckets) + math.prod(cache.shape("text"))
    rows = rows_per_shard(row_bytes * torch.empty((), dtype=cache.dtype).element_size())
    shards, jobs = [], []
    for bucket, members in groupby(used, key=lambda i: plan.bucket_of[i]):
        members = list(members)
        for number, part in enumerate(chunks(len(members), rows)):
            jobs.append([members[j] for j in part])
            shards.append(ShardInfo(shard_name(plan.buckets[bucket], number), bucket, len(part), _shard_source(plan, jobs[-1])))
    processes = how.processes
    if processes.is_main:
        log.info("packing %d samples into %d shard(s) in %s", len(used), len(shards), folder)
    for shard, members in list(zip(shards, jobs))[processes.rank :: processes.world_size]:
        if processes.stop_requested():
            raise KeyboardInterrupt("stopped while packing the data set; run the same command again to go on")
        size = plan.buckets[shard.bucket]
        latents = [_entry(cache, "latents", plan.latent_keys[i], str(plan.samples[i].image), size) for i in members]
        texts = [_entry(cache, "text", plan.text_keys[i], plan.samples[i].caption) for i in members]
        with writing_to_cache(folder / shard.file):
            write_shard(folder / shard.file, latents, texts, shard.source)
    processes.barrier()
    if processes.is_main:
        with writing_to_cache(folder / INDEX_FILE):
            write_index(folder, PackIndex(plan.pack_id(), plan.buckets, shards, left_out))
    processes.barrier()


def _entry(cache: EncodingCache, kind: str, key: str, source: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    tensor = cache.load(kind, key, source, size=size)
    if tensor is None:
        raise InputError(f"cache {cache.root}: the entry of {source[:60]!r} vanished while packing; run the same command again")
    return tensor
