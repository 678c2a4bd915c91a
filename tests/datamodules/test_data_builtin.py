"""Built-in source: determinism, disjoint splits, and each family's ground truth."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from datamodules import BuiltinSource, VisualSentenceDataModule
from datamodules.sources import builtin_draw as draw
from datamodules.sources.builtin import FAMILIES, FAMILY_KINDS
from lvm_pl.batches import ImageBatch, SentenceBatch
from lvm_pl.console import UserError
from lvm_pl.images import to_tensor


def only(family: str, n: int = 6, size: int = 32, **kw) -> VisualSentenceDataModule:
    src = BuiltinSource(weights={family: 1.0}, splits={"train": n, "val": n, "test": n}, **kw)
    return VisualSentenceDataModule(src, image_size=size)


def digest(s) -> str:
    return hashlib.sha1(b"".join(x.tobytes() for x in s.images)).hexdigest()


def test_same_seed_same_bytes_and_other_seed_differs():
    a = [digest(s) for s in VisualSentenceDataModule(BuiltinSource(), image_size=32, seed=3).sentences("val")]
    b = [digest(s) for s in VisualSentenceDataModule(BuiltinSource(), image_size=32, seed=3).sentences("val")]
    c = [digest(s) for s in VisualSentenceDataModule(BuiltinSource(), image_size=32, seed=4).sentences("val")]
    assert a == b
    assert len(set(a) & set(c)) == 0


def test_sentence_does_not_depend_on_order_or_worker():
    dm = VisualSentenceDataModule(BuiltinSource(), image_size=32, unit="sentence", batch_size=4, num_workers=2)
    loaded = torch.cat([b.images[:, 0] for b in dm.val_dataloader()])  # first image of each, via 2 workers
    for i in reversed(range(dm.split_size("val"))):
        assert torch.equal(loaded[i], dm.dataset("val")[i]["images"][0])


def test_splits_are_disjoint_and_sized_by_config():
    dm = VisualSentenceDataModule(BuiltinSource(splits={"train": 120, "val": 40, "test": 30}), image_size=32)
    hashes = {split: {digest(s) for s in dm.sentences(split)} for split in ("train", "val", "test")}
    assert [len(hashes[k]) for k in ("train", "val", "test")] == [120, 40, 30]  # no duplicates within a split
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_renders_its_kind_at_the_image_size(family):
    for s in only(family, n=3, size=48).sentences("train"):
        assert s.kind == FAMILY_KINDS[family] and s.meta["family"] == family
        assert all(x.shape == (48, 48, 3) and x.dtype == np.uint8 for x in s.images)
        assert len(s.images) == 1 if s.kind == "single" else len(s.images) >= 2


def test_moving_objects_follow_their_velocity():
    for s in only("moving", n=8, size=64).sentences("train"):
        top = s.meta["objects"][-1]  # drawn last, so never occluded
        v = np.array(top["velocity"])
        for t, frame in enumerate(s.images):
            expected = np.array(top["positions"][0]) + v * t
            assert np.allclose(top["positions"][t], expected)
            ys, xs = np.nonzero((frame == np.array(top["colour"], np.uint8)).all(-1))
            centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
            assert np.abs(centroid - expected).max() < 1.0, (t, centroid, expected)


def test_fast_moving_objects_bounce_off_the_edges_at_constant_speed():
    size = 64
    dm = only("moving", n=8, size=size, sequence_length=(12, 12), moving_speed=(0.1, 0.15))
    bounced = 0
    for s in dm.sentences("train"):
        top = s.meta["objects"][-1]
        r, positions, velocities = top["r"], np.array(top["positions"]), np.array(top["velocities"])
        speed = np.linalg.norm(top["velocity"])
        assert 0.1 * size <= speed <= 0.15 * size
        assert (positions >= r - 1e-9).all() and (positions <= size - r + 1e-9).all()
        assert np.allclose(np.abs(velocities), np.abs(top["velocity"]))  # reflections flip signs only
        bounced += int((np.diff(np.sign(velocities), axis=0) != 0).any())
        for t in range(1, len(positions)):
            step = positions[t] - positions[t - 1]
            free = np.isclose(np.sign(velocities[t]), np.sign(velocities[t - 1]))
            # an axis without a wall hit moved by exactly its velocity; one with a hit moved less
            assert np.allclose(step[free], velocities[t][free])
            assert (np.abs(step[~free]) <= np.abs(velocities[t][~free]) + 1e-9).all()
        for t, frame in enumerate(s.images):
            ys, xs = np.nonzero((frame == np.array(top["colour"], np.uint8)).all(-1))
            centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
            assert np.abs(centroid - positions[t]).max() < 1.0, (t, centroid, positions[t])
    assert bounced > 0  # 12 frames at >= 6 px a frame: most shapes meet a wall


def test_a_configured_source_pickles_for_spawned_workers():
    # ddp_spawn and DataLoader workers pickle the datamodule: the source must hold data, not closures
    dm = only("moving", n=4, sequence_length=(4, 4), moving_speed=(0.1, 0.15))
    again = pickle.loads(pickle.dumps(dm))
    assert [digest(s) for s in again.sentences("train")] == [digest(s) for s in dm.sentences("train")]


def test_moving_speed_is_checked():
    with pytest.raises(UserError, match="moving_speed"):
        BuiltinSource(moving_speed=(0.2, 0.1))


def test_scaling_rotating_recolour_ground_truth():
    for s in only("scaling", size=64).sentences("val"):
        areas = [(x != x[0, 0]).any(-1).sum() for x in s.images]
        r = s.meta["radii"]
        assert np.sign(areas[-1] - areas[0]) == np.sign(r[-1] - r[0]) or abs(r[-1] - r[0]) < 1
    for s in only("rotating", size=64).sentences("val"):
        steps = np.diff(s.meta["angles"])
        assert np.allclose(steps, s.meta["omega"])
    for s in only("recolour", size=64).sentences("val"):
        for x, c in zip(s.images, s.meta["colours"], strict=True):
            assert (x == np.array(c, np.uint8)).all(-1).any()


def test_pan_frames_are_the_windows_in_meta():
    for s in only("pan", size=32).sentences("test"):
        img = draw.photo(s.meta["photo"])
        offsets = np.array(s.meta["offsets"])
        # constant velocity up to rounding
        assert np.abs(np.diff(offsets, 2, axis=0)).max(initial=0) <= 1
        for x, (ox, oy) in zip(s.images, offsets, strict=True):
            assert np.array_equal(x, draw.crop_resize(img, (ox, oy, s.meta["side"]), 32))


@pytest.mark.parametrize("name", sorted(draw.TRANSFORMS))
def test_analogy_target_is_exactly_t_of_source(name):
    for s in only(name, size=32).sentences("train"):
        assert s.meta["transform"] == name and len(s.images) % 2 == 0
        for x, y in zip(s.images[::2], s.images[1::2], strict=True):
            assert np.array_equal(y, draw.TRANSFORMS[name](x))


def test_segmentation_and_depth_targets_match_their_scenes():
    for family in ("segmentation", "depth"):
        for s in only(family, size=32).sentences("val"):
            for x, y, scene in zip(s.images[::2], s.images[1::2], s.meta["scenes"], strict=True):
                render = draw.render_segmentation if family == "segmentation" else draw.render_depth
                assert np.array_equal(y, render(scene["shapes"], 32))
                # the target's foreground is exactly where the source differs from its background
                assert np.array_equal(y.any(-1), (x != np.array(scene["background"], np.uint8)).any(-1))
    for s in only("depth", size=32).sentences("val"):
        for scene in s.meta["scenes"]:
            assert [sh["depth"] for sh in scene["shapes"]] == sorted(sh["depth"] for sh in scene["shapes"])


def test_stereo_pairs_are_crops_of_view_and_disparity():
    left, disparity = draw.stereo_pair()
    for s in only("stereo", size=32).sentences("train"):
        for x, y, box in zip(s.images[::2], s.images[1::2], s.meta["boxes"], strict=True):
            assert np.array_equal(x, draw.crop_resize(left, tuple(box), 32))
            assert np.array_equal(y, draw.crop_resize(disparity, tuple(box), 32))
            assert (y[..., 0] == y[..., 1]).all()


def test_categories_share_one_class():
    _, labels = draw.digits()
    for s in only("digits", size=32).sentences("train"):
        assert all(labels[k] == s.meta["class"] for k in s.meta["samples"])
        assert len(set(s.meta["samples"])) == len(s.images)
    for s in only("shapes", size=32).sentences("train"):
        assert s.meta["class"] in draw.SHAPES


def test_gif_frames_are_consecutive():
    for s in only("gif", size=32).sentences("train"):
        f = s.meta["frames"]
        assert f == list(range(f[0], f[0] + len(s.images)))


def test_weights_and_lengths_are_respected():
    src = BuiltinSource(weights={"moving": 3, "photo": 1}, splits={"train": 400}, sequence_length=(3, 5))
    dm = VisualSentenceDataModule(src, image_size=16)
    dm.setup()
    plans = [src.plan("train", i) for i in range(400)]
    moving = [n for f, n, _ in plans if f == "moving"]
    assert 0.65 < len(moving) / 400 < 0.85
    assert set(moving) <= {3, 4, 5} and all(n == 1 for f, n, _ in plans if f == "photo")


def test_max_images_cuts_and_batches_follow_the_contract():
    dm = VisualSentenceDataModule(
        only("moving").source, image_size=16, unit="sentence", max_images=3, batch_size=4, min_images=2
    )
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SentenceBatch) and len(batch) == 4 and batch.kinds == ["sequence"] * 4
    assert batch.images.shape[1:] == (3, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert batch.num_images.max() <= 3 and batch.index.dtype == torch.long
    img = VisualSentenceDataModule(only("photo").source, image_size=16, batch_size=5)
    b = next(iter(img.val_dataloader()))
    assert isinstance(b, ImageBatch) and b.images.shape == (5, 3, 16, 16) and b.kinds == ["single"] * 5


def test_bad_config_values_raise_user_errors():
    with pytest.raises(UserError, match="unknown families"):
        BuiltinSource(weights={"movnig": 1})
    with pytest.raises(UserError, match="sequence_length"):
        BuiltinSource(sequence_length=(5, 2))
    with pytest.raises(UserError, match="min_images=3"):
        VisualSentenceDataModule(only("photo").source, min_images=3).setup()


def test_assets_ship_in_the_wheels():
    for name in (*draw.PHOTOS, draw.GIF, "motorcycle_left.png", "motorcycle_disp.npz"):
        assert (draw.skimage_data_dir() / name).is_file(), name


def test_image_unit_yields_every_image_of_every_sentence_once():
    dm = VisualSentenceDataModule(BuiltinSource(splits={"val": 30}), image_size=16, max_images=5, crop="random")
    data = dm.dataset("val")
    expected = [x for s in dm.sentences("val") for x in s.images]
    assert len(data) == len(expected)
    for k in range(len(data)):  # one image is rendered alone, yet equals the same image of its whole sentence
        assert torch.equal(data[k]["image"], to_tensor(expected[k]))
