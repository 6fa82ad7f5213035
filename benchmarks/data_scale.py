"""Training memory and speed against data-set size: the packed shards keep memory flat as N grows.

    python -m benchmarks.data_scale                        # N = 10k and 200k, 100 steps each (about 5 min, 5 GB disk)
    python -m benchmarks.data_scale --sizes 10000 --steps 50

For each N, one process writes N synthetic encoded samples as a pack (what the encoding pass
leaves: ``training/shards.py``), and a fresh process trains a tiny DiT on it for ``--steps``
steps through the trainer's own data path (``PackedData`` read by DataLoader workers, the
``BatchOrder``, the flow-matching loss, AdamW). It prints the training process's peak resident
memory, the largest worker's, and steps/s. A sample is a 64x64 image's latent (128x4x4) and a
128x64 prompt, in bf16: 20 KB, so 200k samples take 4 GB, which the in-memory path would hold.

The 151-sample rows compare the in-memory holder (``InMemoryData``, what small data sets get)
with the indexing the trainer did before holders existed, in alternating pairs of runs, as the
median ratio. A worker's peak includes the pages it shares with the training process it was
forked from.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

LATENT = (128, 4, 4)  # a 64x64 image
TEXT = (128, 64)
BUCKET = (64, 64)
DTYPE = torch.bfloat16


def write_pack(folder: Path, count: int) -> None:
    """``count`` random samples in shards, as the encoding pass would pack them."""
    from training.shards import PackIndex, ShardInfo, chunks, rows_per_shard, shard_name, write_index, write_shard

    row_bytes = (LATENT[0] * LATENT[1] * LATENT[2] + TEXT[0] * TEXT[1]) * DTYPE.itemsize
    gen = torch.Generator().manual_seed(count)
    shards = []
    for number, part in enumerate(chunks(count, rows_per_shard(row_bytes))):
        latents = list(torch.randn(len(part), *LATENT, generator=gen, dtype=DTYPE))
        texts = list(torch.randn(len(part), *TEXT, generator=gen, dtype=DTYPE))
        name = shard_name(BUCKET, number)
        write_shard(folder / name, latents, texts)
        shards.append(ShardInfo(name, 0, len(part)))
    write_index(folder, PackIndex([BUCKET], shards, []))


def in_memory(count: int):
    """An ``InMemoryData`` of ``count`` random samples."""
    from training.cache import CacheStats
    from training.encoded_data import InMemoryData

    gen = torch.Generator().manual_seed(count)
    return InMemoryData(
        buckets=[BUCKET], bucket_ids=torch.zeros(count, dtype=torch.long), extra_prompts={}, text_shape=TEXT,
        fingerprint="", stats=CacheStats(), latents=[torch.randn(count, *LATENT, generator=gen, dtype=DTYPE)],
        text=torch.randn(count, *TEXT, generator=gen, dtype=DTYPE), image_index=torch.arange(count), text_index=torch.arange(count),
    )


def before_holders(data, order, first: int, last: int):
    """The trainer's batch fetching before holders existed: two index operations per micro-batch."""
    for micro_step in range(first, last):
        batch = order.indices(micro_step)
        yield data.latents[0][data.image_index[batch]], data.text[data.text_index[batch]]


def train(variant: str, count: int, folder: str, steps: int, batch_size: int, workers: int, queue) -> None:
    """Runs ``steps`` training steps on one data holder; puts (peak RSS MB, largest worker MB, steps/s) on ``queue``."""
    from aaa_core.dit import AAADiT, AAADiTConfig
    from aaa_core.scheduler import TrainingSchedule
    from training.batches import BatchOrder
    from training.cache import CacheStats
    from training.encoded_data import PackedData
    from training.loss import draw_noise, flow_matching_loss, step_generator
    from training.shards import ShardReader, read_index

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads() - workers))  # the workers get a core each
    if variant == "shards":
        index = read_index(Path(folder))
        data = PackedData(buckets=index.buckets, bucket_ids=index.bucket_ids(), extra_prompts={}, text_shape=TEXT,
                          fingerprint="", stats=CacheStats(), reader=ShardReader(Path(folder), index, 128, TEXT, DTYPE),
                          workers=workers, pin_memory=False)
    else:
        data = in_memory(count)
    order = BatchOrder(data.bucket_ids, batch_size, 0, 1, 0, torch.device("cpu"))
    batches = before_holders(data, order, 0, steps) if variant == "before" else data.batches(order, 0, steps)
    model = AAADiT(AAADiTConfig(64, 2, 4, latent_channels=128, text_dim=TEXT[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = TrainingSchedule.flux2()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        latents, text = next(batches)
        latents = latents.float()
        indices, noise = draw_noise(latents, len(schedule.sigmas), step_generator(0, step, 0, latents.device))
        flow_matching_loss(model, latents, text, indices, noise, schedule, False).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    del batches  # ends the workers, so their peak memory is counted below
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    queue.put((mine, worker, 1 / statistics.median(times[5:] or times)))


def run(variant: str, count: int, folder: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """One variant in a fresh process, so its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=train, args=(variant, count, folder, args.steps, args.batch_size, args.workers, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000], help="data-set sizes N of the packed runs")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the packed runs")
    parser.add_argument("--folder", type=Path, default=None, help="where the packs are written (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of the 151-sample runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory runs at each N (they hold the whole set)")
    args = parser.parse_args()

    print(f"{'data':<28} {'peak RSS':>10} {'worker RSS':>11} {'steps/s':>9}")
    speeds: dict[str, list[float]] = {"before": [], "memory": []}
    for _ in range(args.repeats):  # alternating, so a drift of the machine's speed hits both alike
        for variant, label in (("before", "151 in memory (before)"), ("memory", "151 in memory (InMemoryData)")):
            mine, _, speed = run(variant, 151, "", args)
            speeds[variant].append(speed)
            print(f"{label:<28} {mine:>8.0f} MB {'-':>11} {speed:>9.2f}")
    ratios = [m / b for m, b in zip(speeds["memory"], speeds["before"])]
    print(f"{'':<28} in-memory / before: median {statistics.median(ratios):.2f}x steps/s "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
    with tempfile.TemporaryDirectory(dir=args.folder) as root:
        for count in args.sizes:
            folder = Path(root) / f"pack-{count}"
            started = time.perf_counter()
            writer = multiprocessing.get_context("spawn").Process(target=write_pack, args=(folder, count))
            writer.start()
            writer.join()
            written = time.perf_counter() - started
            size = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
            mine, worker, speed = run("shards", count, str(folder), args)
            label = f"{count:,} in shards ({size:.1f} GB)"
            print(f"{label:<28} {mine:>8.0f} MB {worker:>8.0f} MB {speed:>9.2f}   (packed in {written:.0f} s)")
            if not args.no_memory:
                mine, _, speed = run("memory", count, "", args)
                print(f"{f'{count:,} in memory':<28} {mine:>8.0f} MB {'-':>11} {speed:>9.2f}")
            for path in folder.iterdir():
                path.unlink()  # room for the next size


if __name__ == "__main__":
    main()
