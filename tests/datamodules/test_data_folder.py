"""Folder source: layout, natural order, manifests, image modes, bad files, splits, crops."""

from __future__ import annotations

import json
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from datamodules import FolderSource, VisualSentenceDataModule
from datamodules.imageio import BadImage, fit_image, load_rgb
from datamodules.sources.base import SPLITS
from datamodules.sources.folder import INDEX_NAME
from lvm_pl.console import UserError


def solid(value: int, size=(20, 12)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


@pytest.fixture
def tree(tmp_path):
    """root/seq/{f1,f2,f10}.png (values 1, 2, 10), root/clip/*.jpg, a loose image and a few bad files."""
    root = tmp_path / "root"
    (root / "seq").mkdir(parents=True)
    for k in (10, 1, 2):
        solid(k * 20).save(root / "seq" / f"f{k}.png")
    (root / "clip").mkdir()
    for k in range(3):
        solid(100 + k).save(root / "clip" / f"{k}.jpg", quality=95)
    solid(50).save(root / "loose.png")
    return root


def add_bad_files(root):
    (root / "seq" / "notes.txt").write_text("not an image")
    (root / "seq" / "zero.png").write_bytes(b"")
    (root / "seq" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    good = root / "clip" / "0.jpg"
    data = good.read_bytes()
    (root / "clip" / "3_truncated.jpg").write_bytes(data[: len(data) // 2])
    png = root / "seq" / "f1.png"
    (root / "seq" / "f99_truncated.png").write_bytes(png.read_bytes()[:60])


def png_bomb(path, width: int, height: int) -> None:
    """A valid 1-bit greyscale PNG of all-black `width` x `height` pixels: a few KB on disk per 100 M pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Two real bombs beside a good image: over twice Pillow's limit (its own error) and just over it (only a
    warning from Pillow, which would then decode ~100 M pixels)."""
    where = tmp_path_factory.mktemp("bombs")
    png_bomb(where / "huge.png", 20_000, 20_000)
    png_bomb(where / "large.png", 10_000, 10_000)
    assert max(p.stat().st_size for p in where.iterdir()) < 100_000
    with Image.open(where / "large.png") as img:  # the file is what it says: a decodable 10000 x 10000 image
        assert img.size == (10_000, 10_000) and img.mode == "1"
    return where


def test_an_image_over_the_pixel_limit_is_bad_before_decoding(bombs):
    for name in ("huge.png", "large.png"):
        with pytest.raises(BadImage, match=rf"{name}: DecompressionBombError: .*(exceeds limit|over Pillow's limit)"):
            load_rgb(bombs / name)


def test_bombs_are_skipped_and_counted_like_unreadable_images(tree, bombs):
    for name in ("huge.png", "large.png"):
        (tree / "seq" / name).write_bytes((bombs / name).read_bytes())
    with pytest.warns(UserWarning) as record:
        dm = dm_for(tree)
        dm.setup()
    assert "skipped 2 unreadable images" in " ".join(str(w.message) for w in record)
    assert sorted(dm.source.num_images("train", i) for i in range(dm.split_size("train"))) == [1, 3, 3]
    (tree / "seq" / "huge.png").unlink()
    with pytest.raises(UserError, match=r"bad image \(strict: true\): .*large.png: DecompressionBombError"):
        dm_for(tree, strict=True).setup()


def dm_for(root, **kw) -> VisualSentenceDataModule:
    src = FolderSource(
        str(root),
        val_fraction=0.0,
        test_fraction=0.0,
        **{k: kw.pop(k) for k in list(kw) if k in ("strict", "manifest")},
    )
    return VisualSentenceDataModule(src, image_size=12, **kw)


def test_layout_natural_order_and_kinds(tree):
    dm = dm_for(tree)
    sentences = {s.meta["path"].split("/")[-1]: s for s in dm.sentences("train")}
    assert set(sentences) == {"seq", "clip", "loose.png"}
    assert [int(x[0, 0, 0]) for x in sentences["seq"].images] == [20, 40, 200]  # f1, f2, f10
    assert sentences["seq"].kind == "sequence" and sentences["loose.png"].kind == "single"
    assert all(x.shape == (12, 12, 3) for s in sentences.values() for x in s.images)


def test_bad_files_are_skipped_and_counted(tree):
    add_bad_files(tree)
    with pytest.warns(UserWarning) as record:
        dm = dm_for(tree)
        dm.setup()
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 not image files" in messages
    assert "skipped 4 unreadable images" in messages
    lengths = sorted(dm.source.num_images("train", i) for i in range(dm.split_size("train")))
    assert lengths == [1, 3, 3]


@pytest.mark.parametrize("bad", ["zero.png", "garbage.jpg", "f99_truncated.png", "notes.txt"])
def test_strict_names_the_bad_file(tree, bad):
    add_bad_files(tree)
    for other in {"zero.png", "garbage.jpg", "f99_truncated.png", "notes.txt"} - {bad}:
        (tree / "seq" / other).unlink()
    (tree / "clip" / "3_truncated.jpg").unlink()
    with pytest.raises(UserError, match=bad):
        dm_for(tree, strict=True).setup()


def test_truncated_jpeg_is_caught(tree):
    add_bad_files(tree)
    for name in ("zero.png", "garbage.jpg", "f99_truncated.png", "notes.txt"):
        (tree / "seq" / name).unlink()
    with pytest.raises(UserError, match="3_truncated.jpg"):
        dm_for(tree, strict=True).setup()


def test_empty_folder_and_short_sentence_fail_at_setup(tmp_path, tree):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        dm_for(tmp_path / "empty").setup()
    with pytest.raises(UserError, match="loose.png: 1 images, fewer than data.min_images=2"):
        dm_for(tree, min_images=2).setup()
    with pytest.raises(UserError, match="missing"):
        dm_for(tmp_path / "missing").setup()


def test_modes_are_converted(tmp_path):
    grey16 = Image.fromarray(np.array([[0, 32768], [65535, 65535]], np.uint16))
    grey16.save(tmp_path / "g16.png")
    Image.new("RGBA", (2, 2), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent -> white
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    Image.new("RGB", (2, 2), (0, 0, 255)).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "g16.png")[..., 0].tolist() == [[0, 128], [255, 255]]
    assert (load_rgb(tmp_path / "rgba.png") == 255).all()
    assert (load_rgb(tmp_path / "l.png") == 77).all()
    cmyk = load_rgb(tmp_path / "cmyk.jpg").astype(int)
    assert cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1:].max() < 60
    assert load_rgb(tmp_path / "p.png")[0, 0].tolist() == [0, 0, 255]
    for name in ("g16.png", "rgba.png", "l.png", "cmyk.jpg", "p.png"):
        assert load_rgb(tmp_path / name).shape == (2, 2, 3)


def test_manifest_lists_sentences_with_kinds(tree):
    lines = [
        {"images": ["seq/f2.png", "seq/f1.png"], "kind": "analogy", "meta": {"transform": "brighter"}},
        {"images": ["loose.png"], "kind": "single"},
    ]
    (tree / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dm = dm_for(tree, manifest=str(tree / "m.jsonl"))
    got = sorted(dm.sentences("train"), key=lambda s: s.kind)
    assert [s.kind for s in got] == ["analogy", "single"]
    assert [int(x[0, 0, 0]) for x in got[0].images] == [40, 20] and got[0].meta["transform"] == "brighter"
    (tree / "bad.jsonl").write_text('{"images": ["nope.png"]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: missing image"):
        dm_for(tree, manifest=str(tree / "bad.jsonl")).setup()


def test_splits_are_disjoint_exact_and_stable(tmp_path):
    for k in range(50):
        solid(k).save(tmp_path / f"{k}.png")
    a = FolderSource(str(tmp_path), val_fraction=0.2, test_fraction=0.1)
    a.setup(8, seed=0)
    names = {s: {a.describe(s, i) for i in range(a.split_size(s))} for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [35, 10, 5]
    assert not (names["train"] & names["val"]) and not (names["val"] & names["test"])
    solid(200).save(tmp_path / "new.png")  # adding a file must not move existing ones between splits
    b = FolderSource(str(tmp_path), val_fraction=0.2, test_fraction=0.1)
    b.setup(8, seed=0)
    test_b = {b.describe("test", i) for i in range(b.split_size("test"))}
    assert len(test_b - names["test"]) <= 1


def test_resize_shorter_side_then_crop():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    centre = fit_image(img, 10)
    assert centre.shape == (10, 10, 3) and 0 < centre.mean() < 255
    # 20x40 -> 10x20: the left crop is the white half, the right crop the black one (bar the resampled seam)
    assert (fit_image(img, 10, (0.0, 0.5))[:, :8] == 255).all() and (fit_image(img, 10, (1.0, 0.5))[:, 2:] == 0).all()


def test_random_crop_is_shared_by_a_sentence_and_seeded(tmp_path):
    (tmp_path / "s").mkdir()
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (16, 1, 3))  # wide horizontal ramp
    for k in range(3):
        Image.fromarray(ramp).save(tmp_path / "s" / f"{k}.png")
    src = FolderSource(str(tmp_path), val_fraction=0.0, test_fraction=0.0)
    crops = [VisualSentenceDataModule(src, image_size=16, crop="random", seed=s).sentence("train", 0) for s in range(4)]
    for s in crops:
        assert all(np.array_equal(s.images[0], x) for x in s.images)
    assert len({int(s.images[0][0, 0, 0]) for s in crops}) > 1


def test_image_unit_reads_single_files_like_whole_sentences(tree):
    dm = VisualSentenceDataModule(
        FolderSource(str(tree), val_fraction=0.0, test_fraction=0.0), image_size=8, crop="random"
    )
    data = dm.dataset("train")
    flat = [(x, s.kind) for s in dm.sentences("train") for x in s.images]
    assert len(data) == len(flat) == 7
    for k, (x, kind) in enumerate(flat):
        item = data[k]
        assert item["kind"] == kind and item["image"].shape == (3, 8, 8)
        assert np.array_equal(((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), x)


def listing(src: FolderSource) -> dict[str, list[tuple[str, int]]]:
    return {s: [(src.describe(s, i), src.num_images(s, i)) for i in range(src.split_size(s))] for s in SPLITS}


def counts_of(src: FolderSource) -> dict[str, int]:
    return {path.split("/")[-1]: n for v in listing(src).values() for path, n in v}


def set_up(root, **kw) -> FolderSource:
    src = FolderSource(str(root), val_fraction=0.3, test_fraction=0.0, **kw)
    src.setup(8, seed=0)
    return src


def test_the_index_is_reused_and_rebuilt_when_the_tree_changes(tree):
    first = set_up(tree)
    index = tree / INDEX_NAME
    written = index.stat().st_mtime_ns
    # changed in place, a file leaves its folder's time as it was: listed and verified again, it would be dropped
    (tree / "clip" / "1.jpg").write_bytes(b"not a jpeg any more")
    again = set_up(tree)
    assert index.stat().st_mtime_ns == written and listing(again) == listing(first)
    assert counts_of(again) == {"seq": 3, "clip": 3, "loose.png": 1} and isinstance(again.index.paths.base, np.memmap)
    solid(30).save(tree / "seq" / "f3.png")  # a file added to a sentence folder
    with pytest.warns(UserWarning, match="skipped 1 unreadable images"):
        grown = set_up(tree)
    assert index.stat().st_mtime_ns > written
    assert counts_of(grown) == {"seq": 4, "clip": 2, "loose.png": 1}
    assert [int(x[0, 0, 0]) for x in grown.sentence(*where(grown, "seq")).images] == [20, 40, 30, 200]
    written = index.stat().st_mtime_ns
    solid(60).save(tree / "more.png")  # a loose image: the root changes
    assert sum(len(v) for v in listing(set_up(tree)).values()) == 4 and index.stat().st_mtime_ns > written
    written = index.stat().st_mtime_ns
    set_up(tree, reindex=True)
    assert index.stat().st_mtime_ns > written


def where(src: FolderSource, name: str) -> tuple[str, int]:
    return next((s, i) for s in SPLITS for i in range(src.split_size(s)) if src.describe(s, i).endswith(name))


def test_index_path_elsewhere_and_a_spawned_worker_maps_it_again(tree, tmp_path):
    src = set_up(tree, index_path=str(tmp_path / "idx" / "tree.npy"))
    assert (tmp_path / "idx" / "tree.npy").is_file() and not (tree / INDEX_NAME).exists()
    copy = pickle.loads(pickle.dumps(src))
    assert isinstance(copy.index.paths.base, np.memmap) and listing(copy) == listing(src)
    assert np.array_equal(copy.sentence(*where(copy, "seq")).images, src.sentence(*where(src, "seq")).images)


def test_sampled_verification_then_bad_images_skipped_and_counted_while_loading(tree):
    add_bad_files(tree)
    with pytest.warns(UserWarning) as record:
        src = FolderSource(str(tree), val_fraction=0.0, test_fraction=0.0, verify=100)
        dm = VisualSentenceDataModule(src, image_size=12)
        dm.setup()
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 not image files" in messages and "4 of 11 sampled images unreadable (36.4%)" in messages
    assert sorted(src.num_images("train", i) for i in range(3)) == [1, 4, 6]  # listed, not verified
    with pytest.warns(UserWarning) as record:
        lengths = sorted(len(s.images) for s in dm.sentences("train"))
        images = [dm.dataset("train")[k]["image"] for k in range(11)]  # the 4 bad ones give the next readable
    assert lengths == [1, 3, 3] and all(x.shape == (3, 12, 12) for x in images)
    counted = [
        int(m)
        for m in re.findall(r"skipped (\d+) unreadable images while loading", str([str(w.message) for w in record]))
    ]
    assert counted == [1, 2, 4, 8]  # 4 in the sentences, 4 more as single images
    with pytest.raises(UserError, match=r"bad image \(strict: true\): .*(zero.png|garbage.jpg|truncated)"):
        (tree / "seq" / "notes.txt").unlink()
        FolderSource(str(tree), strict=True, verify=100).setup(12, 0)


def test_an_index_that_cannot_be_written_stays_in_memory(tree):
    with pytest.warns(UserWarning, match=r"loose.png: cannot make the folder index's folder .* stays in memory"):
        src = set_up(tree, index_path=str(tree / "loose.png" / "index.npy"))
    assert src.index.file is None and counts_of(src) == {"seq": 3, "clip": 3, "loose.png": 1}
