import json

import numpy as np
import pytest

from lvm_pl import shards
from lvm_pl.console import UserError
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=16, tokens_per_image=4, num_special=4)


def _images(rng, counts):
    return [rng.integers(0, LAYOUT.codebook_size, size=(n, LAYOUT.tokens_per_image)) for n in counts]


def test_write_split_layout_index_and_manifest(tmp_path):
    imgs = _images(np.random.default_rng(0), [1, 3, 2, 1])
    manifest = shards.write_split(tmp_path, "train", LAYOUT, imgs, kinds=["a", "b", "a", "b"], shard_tokens=20)
    # sentence lengths 6, 14, 10, 6: shards close once they hold >= 20 tokens -> [6+14], [10+6]
    assert [s["tokens"] for s in manifest["shards"]] == [20, 16]
    assert manifest["counts"] == {"shards": 2, "sentences": 4, "images": 7, "tokens": 36}
    m = shards.load_manifest(tmp_path)
    assert m.layout == LAYOUT and m.dtype == np.uint16
    idx = shards.read_shard_index(m.idx_path(m.shards[1]))
    assert idx.offsets.tolist() == [0, 10, 16]
    assert idx.index.tolist() == [2, 3] and idx.num_images.tolist() == [2, 1]
    assert [idx.kinds[k] for k in idx.kind] == ["a", "b"]
    tokens = shards.open_tokens(m.bin_path(m.shards[1]), m.dtype)
    # the documented layout: [BOS] img_1 ... img_N [EOS], raster order, little-endian uint16
    assert tokens[:10].tolist() == [LAYOUT.bos_id, *imgs[2].reshape(-1).tolist(), LAYOUT.eos_id]
    raw = np.frombuffer(m.bin_path(m.shards[1]).read_bytes(), dtype="<u2")
    assert np.array_equal(raw, tokens)
    for shard in m.shards:
        shards.validate_shard(m, shard, full=True)


def test_truncated_shard_is_named(tmp_path):
    shards.write_split(tmp_path, "train", LAYOUT, _images(np.random.default_rng(1), [2, 2]))
    m = shards.load_manifest(tmp_path)
    path = m.bin_path(m.shards[0])
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match=rf"{path}: truncated"):
        shards.validate_shard(m, m.shards[0], full=False)


def test_corrupted_shard_fails_checksum_only_in_full_mode(tmp_path):
    shards.write_split(tmp_path, "train", LAYOUT, _images(np.random.default_rng(2), [2, 2]))
    m = shards.load_manifest(tmp_path)
    path = m.bin_path(m.shards[0])
    data = bytearray(path.read_bytes())
    data[4] ^= 1  # stays a codebook id, same size: only the checksum can tell
    path.write_bytes(bytes(data))
    shards.validate_shard(m, m.shards[0], full=False)
    with pytest.raises(UserError, match=rf"{path}: corrupted"):
        shards.validate_shard(m, m.shards[0], full=True)


def test_out_of_range_id_is_named(tmp_path):
    imgs = _images(np.random.default_rng(3), [2])
    imgs[0][1, 2] = LAYOUT.vocab_size + 5  # the writer trusts its input; the reader must not
    shards.write_split(tmp_path, "val", LAYOUT, imgs)
    m = shards.load_manifest(tmp_path)
    bad = LAYOUT.vocab_size + 5
    with pytest.raises(UserError, match=rf"{m.bin_path(m.shards[0])}: token id {bad} is out of range"):
        shards.validate_shard(m, m.shards[0], full=True)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path / 'manifest.json'}: no token manifest"):
        shards.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a version 1 lvm-pl-token-shards manifest"):
        shards.load_manifest(tmp_path)


def test_missing_shard_and_broken_index(tmp_path):
    shards.write_split(tmp_path, "train", LAYOUT, _images(np.random.default_rng(4), [1, 1]), shard_tokens=1)
    m = shards.load_manifest(tmp_path)
    m.bin_path(m.shards[1]).unlink()
    with pytest.raises(UserError, match="is missing"):
        shards.validate_shard(m, m.shards[1], full=False)
    for damaged in (b"not a zip", m.idx_path(m.shards[0]).read_bytes()[:-30]):
        m.idx_path(m.shards[0]).write_bytes(damaged)
        with pytest.raises(UserError, match="unreadable shard index"):
            shards.read_shard_index(m.idx_path(m.shards[0]))


def test_shard_names_name_their_split():
    assert shards.shard_name("val", 12) == "val-000012"
    assert shards.shard_split(shards.shard_name("val", 12)) == "val"
    assert shards.shard_split("train-shard.00012") == "train"  # a unit named after its input shard
    assert shards.shard_split("train-r00000-00003") == "train"  # written before work units
    assert shards.shard_split("manifest") is None


def test_int32_storage_for_large_vocabularies(tmp_path):
    big = TokenLayout(codebook_size=70000, tokens_per_image=4)
    imgs = [np.array([[69999, 0, 1, 65536]])]
    shards.write_split(tmp_path, "train", big, imgs)
    m = shards.load_manifest(tmp_path)
    assert m.dtype == np.int32
    assert shards.open_tokens(m.bin_path(m.shards[0]), m.dtype).tolist() == [70000, 69999, 0, 1, 65536, 70001]
    shards.validate_shard(m, m.shards[0], full=True)
