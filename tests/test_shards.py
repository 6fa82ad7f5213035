"""The packed data set's shards: written atomically, read back row by row exactly, damage named, bound to their samples."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from aaa_core.errors import InputError
from training.shards import (
    INDEX_FILE, PackIndex, ShardInfo, ShardReader, chunks, read_index, rows_per_shard, rows_source, shard_name, write_index,
    write_shard,
)

BUCKETS = [(32, 32), (48, 16)]  # (width, height): latents 2x2 and 1x3
TEXT = (4, 8)


def rows(bucket: tuple[int, int], count: int, seed: int, dtype=torch.bfloat16):
    width, height = bucket
    gen = torch.Generator().manual_seed(seed)
    latents = [torch.randn(128, height // 16, width // 16, generator=gen).to(dtype) for _ in range(count)]
    texts = [torch.randn(*TEXT, generator=gen).to(dtype) for _ in range(count)]
    return latents, texts


def write_pack(folder, data_set: str, seed: int = 0):
    """Bucket 0 in two shards (3 + 2 rows), bucket 1 in one (4 rows); the cache keys name ``data_set``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    shards = []
    for bucket, sizes in ((0, (3, 2)), (1, (4,))):
        for number, count in enumerate(sizes):
            latents, texts = rows(BUCKETS[bucket], count, seed=seed + 10 * bucket + number)
            name = shard_name(BUCKETS[bucket], number)
            keys = [f"{data_set}-{bucket}-{number}-{row}" for row in range(count)]
            source = rows_source(keys, keys)
            write_shard(folder / name, latents, texts, source)
            shards.append(ShardInfo(name, bucket, count, source))
            written[name] = (latents, texts)
    index = PackIndex(data_set, BUCKETS, shards, [("/data/broken.png", "not an image")])
    write_index(folder, index)
    return folder, written


@pytest.fixture()
def pack(tmp_path):
    return write_pack(tmp_path / "pack", "data-a")


def reader_of(folder, dtype=torch.bfloat16):
    return ShardReader(folder, read_index(folder), 128, TEXT, dtype)


def test_rows_read_back_exactly_in_pack_order(pack):
    folder, written = pack
    reader = reader_of(folder)
    assert len(reader) == 9
    assert reader.index.bucket_ids().tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert reader.index.skipped == [("/data/broken.png", "not an image")]
    latents, texts = reader.read(torch.tensor([4, 0, 3]))  # across both shards of bucket 0
    first, second = written["shard-32x32-00000.safetensors"], written["shard-32x32-00001.safetensors"]
    assert torch.equal(latents, torch.stack([second[0][1], first[0][0], second[0][0]]))
    assert torch.equal(texts, torch.stack([second[1][1], first[1][0], second[1][0]]))
    wide, _ = reader.read(torch.tensor([8, 5]))
    assert wide.shape == (2, 128, 1, 3) and wide.dtype == torch.bfloat16
    assert torch.equal(wide[1], written["shard-48x16-00000.safetensors"][0][0])


def test_a_shard_is_a_plain_safetensors_file(pack):
    folder, written = pack
    with safe_open(str(folder / "shard-48x16-00000.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["crc32", "latents", "text"]
        assert torch.equal(handle.get_tensor("latents"), torch.stack(written["shard-48x16-00000.safetensors"][0]))


def test_a_damaged_row_is_named_when_read(pack):
    folder, _ = pack
    path = folder / "shard-32x32-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte: part of the text of the last row
    path.write_bytes(bytes(data))
    reader = reader_of(folder)
    reader.read(torch.tensor([0, 1, 2, 3]))  # the other rows still read
    with pytest.raises(InputError, match=r"shard-32x32-00001.safetensors: row 1 does not match its checksum"):
        reader.read(torch.tensor([4]))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "cut short"),
    (lambda p: p.write_bytes(b"garbage"), "header unreadable"),
    (lambda p: p.unlink(), "file missing"),
])
def test_a_damaged_shard_is_named_before_training(pack, damage, message):
    folder, _ = pack
    damage(folder / "shard-48x16-00000.safetensors")
    with pytest.raises(InputError, match=f"shard-48x16-00000.safetensors: damaged training data shard \\({message}.*delete the folder"):
        reader_of(folder)


def test_a_shard_of_another_dtype_or_shape_is_refused(pack):
    folder, _ = pack
    with pytest.raises(InputError, match="'latents' is BF16 .* expected torch.float32"):
        reader_of(folder, dtype=torch.float32)
    with pytest.raises(InputError, match="expected"):
        ShardReader(folder, read_index(folder), 128, (4, 9), torch.bfloat16)


SHARD = {"file": "shard-32x32-00000.safetensors", "bucket": 0, "rows": 1, "source": "0" * 64}


@pytest.mark.parametrize("record", [
    "not json", '{"format": 99}', '{"format": 2, "pack": "p", "buckets": [], "shards": [], "skipped": []}',
    json.dumps({"format": 2, "pack": "p", "buckets": [[32, 32]], "shards": [{**SHARD, "bucket": 3}], "skipped": []}),
    json.dumps({"format": 2, "pack": "p", "buckets": [[32, 32]], "shards": [{**SHARD, "source": "x"}], "skipped": []}),
    json.dumps({"format": 1, "buckets": [[32, 32]], "shards": [SHARD], "skipped": []}),  # the format before sources
])
def test_an_incomplete_or_foreign_index_means_no_pack(tmp_path, record):
    assert read_index(tmp_path) is None  # no index: the pack is incomplete
    (tmp_path / INDEX_FILE).write_text(record, encoding="utf-8")
    assert read_index(tmp_path) is None


def test_a_shard_copied_from_another_data_set_is_refused(pack, tmp_path):
    """Same name, shapes and valid row checksums: only the recorded source tells it apart."""
    folder, _ = pack
    other, _ = write_pack(tmp_path / "other", "data-b", seed=100)
    name = "shard-32x32-00001.safetensors"
    shutil.copy(other / name, folder / name)
    ShardReader(other, read_index(other), 128, TEXT, torch.bfloat16).read(torch.tensor([3, 4]))  # valid in its own pack
    with pytest.raises(InputError) as refused:
        reader_of(folder)
    message = str(refused.value)
    assert f"{folder / name}: holds other samples than this data set's" in message
    assert f"delete the folder {folder} " in message and "\n" not in message


@pytest.mark.parametrize("planted", ["../../../mine/notes.txt", "/etc/hostname", "sub/shard-32x32-00000.safetensors"])
def test_an_index_naming_files_outside_the_pack_is_not_followed(pack, tmp_path, caplog, planted):
    folder, _ = pack
    record = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    record["shards"][0]["file"] = planted
    (folder / INDEX_FILE).write_text(json.dumps(record), encoding="utf-8")
    assert read_index(folder) is None  # damaged: packed again from the cache, inside the pack folder
    assert "is not a shard of this folder" in caplog.text


def test_a_shard_that_links_out_of_the_pack_is_refused_naming_the_pack_folder(pack, tmp_path):
    folder, _ = pack
    name = "shard-48x16-00000.safetensors"
    outside = tmp_path / "mine" / "notes.safetensors"
    outside.parent.mkdir()
    shutil.move(folder / name, outside)
    os.symlink(outside, folder / name)
    with pytest.raises(InputError, match=f"a link, not a file of the pack folder\\); delete the folder {folder} "):
        reader_of(folder)


def test_reader_survives_pickling_for_spawned_workers(pack):
    import pickle

    folder, _ = pack
    reader = reader_of(folder)
    expected = reader.read(torch.tensor([6]))
    again = pickle.loads(pickle.dumps(reader))
    assert again._files == {}
    assert all(torch.equal(a, b) for a, b in zip(again.read(torch.tensor([6])), expected))
    reader.close()
    again.close()


def test_shard_sizes():
    assert rows_per_shard(1 << 20) == 256 and rows_per_shard(1 << 40) == 1
    assert [list(r) for r in chunks(5, 2)] == [[0, 1], [2, 3], [4]]
    assert json.dumps(shard_name((352, 176), 3)) == '"shard-352x176-00003.safetensors"'
