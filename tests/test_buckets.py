"""Aspect-ratio buckets: parsing, assignment, the per-bucket batch order, non-square images and sample grids."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aaa_core.errors import InputError
from aaa_core.dit import load_dit
from aaa_core.images import open_rgb, tensor_to_pil
from aaa_core.limits import MAX_RESOLUTION
from aaa_core.pipeline import decode_latents
from aaa_core.sampling import make_noise, sample
from aaa_core.vae import load_vae
from tiny_models import save_tiny_dit, save_tiny_vae
from training.batches import BatchOrder
from training.buckets import Bucket, assign_bucket, image_size, parse_buckets, wide_and_tall
from training.config import parse_config
from training.pairs import load_image
from training.sample_grids import render_grid, tile, write_prompt_list


def test_square_is_the_one_resolution_bucket():
    assert parse_buckets("square", 256) == [Bucket(256, 256)]
    assert (Bucket(352, 176).name, Bucket(352, 176).latent_size) == ("352x176", (11, 22))
    assert wide_and_tall([Bucket(256, 256)]) == []


@pytest.mark.parametrize("resolution", [256, 512])
def test_aspect_buckets_keep_the_area_and_span_1_to_2_through_2_to_1(resolution):
    buckets = parse_buckets("aspect", resolution)
    area = resolution * resolution
    assert Bucket(resolution, resolution) in buckets and buckets == sorted(set(buckets))
    assert len(buckets) > 5
    for bucket in buckets:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0
        assert 0.9 * area <= bucket.width * bucket.height <= area
        assert 1 / 2 <= bucket.width / bucket.height <= 2
    ratios = sorted(math.log(b.width / b.height) for b in buckets)
    assert ratios[0] < math.log(1 / 1.8) and ratios[-1] > math.log(1.8)  # reaches near both ends
    assert set(buckets) == {Bucket(b.height, b.width) for b in buckets}  # tall shapes mirror the wide ones
    wide, tall = wide_and_tall(buckets)
    assert wide == (buckets[-1].width, buckets[-1].height) and tall == (wide[1], wide[0]) and wide[0] > wide[1]


def test_the_buckets_option_is_checked_at_start_and_recorded(tmp_path):
    cfg = parse_config(["--data", "x", "--buckets", "aspect", "--resolution", "512"])
    assert cfg.buckets == "aspect" and 'buckets = "aspect"' in cfg.to_toml().splitlines()
    assert parse_config(["--data", "x"]).buckets == "square"
    with pytest.raises(InputError, match="^buckets 'tall': 'tall' is not WIDTHxHEIGHT"):
        parse_config(["--data", "x", "--buckets", "tall"])


def test_explicit_bucket_lists_keep_their_order():
    assert parse_buckets(" 512x256, 256X512,384x384 ", 256) == [Bucket(512, 256), Bucket(256, 512), Bucket(384, 384)]
    assert wide_and_tall(parse_buckets("512x256,384x384", 256)) == [(512, 256)]  # no tall bucket, no tall image


@pytest.mark.parametrize(
    "spec, complaint",
    [
        ("", "'' is not WIDTHxHEIGHT"),
        ("wide", "'wide' is not WIDTHxHEIGHT"),
        ("512x256,", "'' is not WIDTHxHEIGHT"),
        ("512*256", "'512*256' is not WIDTHxHEIGHT"),
        ("-16x16", "'-16x16' is not WIDTHxHEIGHT"),
        ("512x250", "'512x250' has a side of 250"),
        ("0x16", "'0x16' has a side of 0"),
        (f"{MAX_RESOLUTION + 16}x16", f"has a side of {MAX_RESOLUTION + 16}"),
        ("16x" + "1" * 5000, "has a side of 1111"),  # too long for int(): still one line
        ("512x256,256x512,512x256", "512x256 listed more than once"),
    ],
)
def test_bad_bucket_specs_name_the_bad_part(spec, complaint):
    with pytest.raises(InputError) as excinfo:
        parse_buckets(spec, 256)
    message = str(excinfo.value)
    assert message.startswith(f"buckets '{spec}': ") and complaint in message and "\n" not in message
    if "listed more" not in complaint:
        assert "use 'square', 'aspect' or a list of WIDTHxHEIGHT sizes" in message


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = parse_buckets("aspect", 256)
    assert buckets[assign_bucket(2000, 1000, buckets)] == Bucket(352, 176)
    assert buckets[assign_bucket(5000, 1000, buckets)] == Bucket(352, 176)  # beyond the widest: still the widest
    assert buckets[assign_bucket(1000, 2000, buckets)] == Bucket(176, 352)
    assert buckets[assign_bucket(640, 640, buckets)] == Bucket(256, 256)
    assert buckets[assign_bucket(1500, 1000, buckets)] == Bucket(304, 208)  # log(1.5) nearest log(304/208)
    pair = [Bucket(512, 256), Bucket(256, 512)]
    assert assign_bucket(300, 300, pair) == 0 and assign_bucket(300, 300, pair[::-1]) == 0  # a tie: the first listed
    sizes = [(w, h) for w in range(16, 1000, 37) for h in range(16, 1000, 41)]
    counts = np.bincount([assign_bucket(w, h, buckets) for w, h in sizes], minlength=len(buckets))
    assert counts.sum() == len(sizes) and (counts > 0).all()  # one bucket each, and every bucket gets some


def test_image_size_reads_the_header_and_honours_exif_rotation(tmp_path):
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 20), (200, 10, 10)).save(plain)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation  # 3: upside down; 6 and 8: turned a quarter, so the sides swap
        Image.new("RGB", (60, 20), (200, 10, 10)).save(rotated, exif=exif)
        assert image_size(rotated) == open_rgb(rotated).size == ((60, 20) if orientation == 3 else (20, 60))
    assert image_size(plain) == (60, 20)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        image_size(tmp_path / "broken.png")
    with pytest.raises(InputError, match="gone.png: image not found"):
        image_size(tmp_path / "gone.png")


def test_load_image_gives_the_non_square_size_asked_for(tmp_path):
    path = tmp_path / "wide.png"
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (100, 1))  # left black, right white
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(path)
    pixels = load_image(path, 64, 32, torch.float32)
    assert pixels.shape == (3, 32, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # Scaled to 96x32 to cover, the middle 64 columns kept: the edges are a sixth in from black and white.
    assert abs(pixels[:, :, 0].mean() + 2 / 3) < 0.05 and abs(pixels[:, :, -1].mean() - 2 / 3) < 0.05
    tall = load_image(path, 32, 64, torch.float32)
    assert tall.shape == (3, 64, 32) and abs(tall.mean().item()) < 0.05  # the centre column band, mid-grey on average


def _todays_indices(num_samples, batch_size, rank, world_size, seed, micro_step):
    """The order before buckets (one stream of epoch permutations), copied here to pin the single-bucket case."""
    start = (micro_step * world_size + rank) * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_samples)
        out.append(torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[offset].item())
    return out


CPU = torch.device("cpu")


@pytest.mark.parametrize("num_samples, batch_size, world_size, seed", [(10, 3, 2, 7), (5, 4, 3, 0), (37, 8, 1, 123), (64, 2, 4, 2**32 - 1)])
def test_one_bucket_gives_exactly_the_order_before_buckets(num_samples, batch_size, world_size, seed):
    ids = torch.zeros(num_samples, dtype=torch.long)
    for rank in range(world_size):
        order = BatchOrder(ids, batch_size, rank, world_size, seed, CPU)
        for micro_step in (*range(12), 57, 1000):
            assert order.bucket(micro_step) == 0
            assert order.indices(micro_step).tolist() == _todays_indices(num_samples, batch_size, rank, world_size, seed, micro_step)


def _uneven_buckets():
    """Four buckets of 2, 0 (empty), 13 and 30 samples, interleaved."""
    ids = torch.tensor([3, 0, 2] * 10 + [2] * 3 + [0], dtype=torch.long)
    ids[::4] = 3
    return ids


def test_every_micro_batch_comes_from_one_bucket_on_every_process():
    ids, batch_size, world = _uneven_buckets(), 3, 2
    orders = [BatchOrder(ids, batch_size, rank, world, seed=5, device=CPU) for rank in range(world)]
    seen = set()
    for micro_step in range(3 * orders[0].round_length):
        bucket = orders[0].bucket(micro_step)
        seen.add(bucket)
        for order in orders:
            assert order.bucket(micro_step) == bucket
            batch = order.indices(micro_step)
            assert batch.shape == (batch_size,) and (ids[batch] == bucket).all()
    assert seen == set(ids.tolist()) and 1 not in seen  # the empty bucket is never drawn


def test_one_round_shows_every_sample_and_visits_buckets_in_proportion():
    ids, batch_size, world = _uneven_buckets(), 2, 3
    group = batch_size * world
    orders = [BatchOrder(ids, batch_size, rank, world, seed=11, device=CPU) for rank in range(world)]
    sizes = torch.bincount(ids)
    round_length = orders[0].round_length
    assert round_length == sum(math.ceil(n / group) for n in sizes.tolist())
    batches = [torch.cat([order.indices(m) for order in orders]) for m in range(round_length)]
    shown = torch.cat(batches)
    assert set(shown.tolist()) == set(range(len(ids)))  # nothing left out
    per_bucket = torch.bincount(ids[shown], minlength=len(sizes))
    assert per_bucket.tolist() == [math.ceil(n / group) * group for n in sizes.tolist()]
    # Rounds are shuffled afresh: not the same bucket sequence twice in a row.
    order = orders[0]
    assert [order.bucket(m) for m in range(round_length)] != [order.bucket(m) for m in range(round_length, 2 * round_length)]


def test_the_bucketed_order_is_a_pure_function_of_seed_and_step():
    ids = _uneven_buckets()
    used = BatchOrder(ids, 4, 1, 2, seed=3, device=CPU)
    for micro_step in range(80):  # walks past several epochs and rounds, so the caches are pruned
        used.indices(micro_step)
    fresh = BatchOrder(ids, 4, 1, 2, seed=3, device=CPU)
    assert torch.equal(fresh.indices(57), used.indices(57)) and fresh.bucket(57) == used.bucket(57)
    other_seed = BatchOrder(ids, 4, 1, 2, seed=4, device=CPU)
    assert [other_seed.bucket(m) for m in range(20)] != [fresh.bucket(m) for m in range(20)]
    assert fresh.epoch(10) == 10 * 4 * 2 / len(ids)


def test_processes_share_a_micro_batch_without_overlap():
    """Buckets of whole multiples of G never straddle an epoch inside a micro-batch, so no sample repeats there.

    (A micro-batch across an epoch boundary may hold a sample twice, as the order before buckets did.)
    """
    ids = torch.tensor([0] * 12 + [1] * 18 + [2] * 4, dtype=torch.long)[torch.randperm(34, generator=torch.Generator().manual_seed(0))]
    batch_size, world = 2, 3
    orders = [BatchOrder(ids, batch_size, rank, world, seed=1, device=CPU) for rank in range(world)]
    for micro_step in range(4 * orders[0].round_length):
        batch = torch.cat([order.indices(micro_step) for order in orders])
        if orders[0].bucket(micro_step) != 2:  # bucket 2 is smaller than a micro-batch: it must repeat
            assert len(set(batch.tolist())) == batch_size * world


def test_sample_grid_adds_the_first_prompt_wide_and_tall_in_a_row_below(tmp_path):
    dit = load_dit(save_tiny_dit(tmp_path / "dit.safetensors"))
    vae = load_vae(save_tiny_vae(tmp_path / "vae.safetensors"))
    prompts, negative = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 32)
    render = functools.partial(render_grid, dit, vae, prompts, negative, resolution=16, steps=2, cfg=4.0, seed=3)
    plain = render()
    # Without extra sizes: the grid as before buckets (both prompts in one batch, prompt i with seed + i, tiled).
    latents = sample(dit, make_noise(3, 2, 1, 1), prompts, negative[None], 2, 4.0)
    assert np.array_equal(np.asarray(plain), np.asarray(tile(tensor_to_pil(decode_latents(vae, latents)))))

    grid = np.asarray(render(extra_sizes=[(32, 16), (16, 32)]))
    assert grid.shape == (16 + 32, 16 + 32, 3)  # the 32x16 grid, then a 32x16 and a 16x32 image under it
    assert np.array_equal(grid[:16, :32], np.asarray(plain))  # the square cells untouched
    assert (grid[:16, 32:] == 255).all() and (grid[32:, :32] == 255).all()  # white where no image is
    assert not (grid[16:32, :32] == 255).all() and not (grid[16:, 32:] == 255).all()
    # Prompt 0's own seed: at the square size the extra image is grid cell 0 (up to batch-size rounding).
    same = np.asarray(render(extra_sizes=[(16, 16)])).astype(int)
    assert np.abs(same[16:, :16] - same[:16, :16]).max() <= 2


def test_prompt_list_names_the_wide_and_tall_images(tmp_path):
    path = tmp_path / "prompts.txt"
    write_prompt_list(path, ["a cat", "a dog"], 7, extra_sizes=wide_and_tall(parse_buckets("aspect", 256)))
    assert path.read_text(encoding="utf-8").splitlines() == [
        "cell 0 (seed 7): a cat", "cell 1 (seed 8): a dog", "wide 352x176 (seed 7): a cat", "tall 176x352 (seed 7): a cat"]
