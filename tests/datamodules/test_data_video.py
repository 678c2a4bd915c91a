"""Video source: windows of `length` frames every `stride`, frame order, short and broken files, exact seeking."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import VideoSource, VisualSentenceDataModule
from datamodules.sources.video import count_frames, read_clip
from lvm_pl.console import UserError

av = pytest.importorskip("av")


def write_video(path, frames: int, size: int = 32) -> None:
    """Frame k is a flat grey of level 10 * k, so decoded frames can be identified."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            img = np.full((size, size, 3), 10 * k, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def level(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / 10)


def test_windows_length_stride_and_frame_order(tmp_path):
    write_video(tmp_path / "a.mp4", 20)
    write_video(tmp_path / "b.mp4", 9)
    src = VideoSource(str(tmp_path), length=4, stride=5, frame_step=2, val_fraction=0.0, test_fraction=0.0)
    dm = VisualSentenceDataModule(src, image_size=16, unit="sentence", min_images=4, batch_size=2)
    got = sorted((s.meta["path"].split("/")[-1], [level(x) for x in s.images]) for s in dm.sentences("train"))
    # a.mp4: span 7 frames, starts 0, 5, 10 (15 would end at 21 > 19); b.mp4: start 0 only
    assert got == [
        ("a.mp4", [0, 2, 4, 6]),
        ("a.mp4", [5, 7, 9, 11]),
        ("a.mp4", [10, 12, 14, 16]),
        ("b.mp4", [0, 2, 4, 6]),
    ]
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (2, 4, 3, 16, 16) and batch.kinds == ["sequence", "sequence"]


def test_short_video_fails_at_setup_naming_it(tmp_path):
    write_video(tmp_path / "short.mp4", 5)
    with pytest.raises(UserError, match=r"short\.mp4: 5 frames, fewer than one sentence needs \(16\)"):
        VisualSentenceDataModule(VideoSource(str(tmp_path)), image_size=16).setup()


def test_broken_video_is_skipped_or_strict(tmp_path):
    write_video(tmp_path / "ok.mp4", 16)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.warns(UserWarning, match="skipped 1 unreadable videos"):
        src = VideoSource(str(tmp_path), val_fraction=0.0, test_fraction=0.0)
        src.setup(16, 0)
    assert src.split_size("train") == 1
    with pytest.raises(UserError, match="broken.mp4"):
        VideoSource(str(tmp_path), strict=True).setup(16, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no video files"):
        VideoSource(str(tmp_path / "empty")).setup(16, 0)
    with pytest.raises(UserError, match="does not exist"):
        VideoSource(str(tmp_path / "nothing")).setup(16, 0)


KEYINT, FRAMES = 12, 60


def write_moving(path, codec: str, frames: int = FRAMES) -> None:
    """A textured picture sliding right a pixel a frame (motion the encoder predicts), a keyframe every KEYINT."""
    texture = np.random.default_rng(0).integers(0, 256, (48, 96, 3), np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = KEYINT
        for k in range(frames):
            img = np.ascontiguousarray(np.roll(texture, k, axis=1)[:, :64])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """H.264 in mp4 (B-frames, frame count in the header), VP9 in webm (no count, no stream duration), MPEG-4 in
    avi, each with every frame decoded from the start as the reference."""
    where = tmp_path_factory.mktemp("seek")
    made = {}
    for name, codec in (("h264.mp4", "libx264"), ("vp9.webm", "libvpx-vp9"), ("mpeg4.avi", "mpeg4")):
        write_moving(where / name, codec)
        with av.open(str(where / name)) as container:
            made[where / name] = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return made


def test_frame_counts_come_from_the_container(videos):
    for path, frames in videos.items():
        assert len(frames) == FRAMES and count_frames(path) == FRAMES, path
    with av.open(str(next(p for p in videos if p.suffix == ".webm"))) as container:
        assert not container.streams.video[0].frames  # counted by demuxing, not read from a header


@pytest.mark.parametrize("start, step", [(45, 1), (37, 2), (0, 1), (FRAMES - 4, 1)])
def test_a_late_clip_is_exactly_the_frames_decoding_from_zero_gives_at_bounded_cost(videos, start, step):
    length = 4
    wanted = range(start, start + length * step, step)
    for path, reference in videos.items():
        got, decoded = read_clip(path, wanted)
        assert len(got) == length, path
        for number, frame in zip(wanted, got, strict=True):
            assert np.array_equal(frame, reference[number]), (path, number)
        assert decoded <= KEYINT + (length - 1) * step + 1, (path, decoded)


def test_the_source_reads_seeked_clips(videos):
    path = next(p for p in videos if p.suffix == ".mp4")
    src = VideoSource(str(path), length=4, stride=8, val_fraction=0.0, test_fraction=0.0)
    src.setup(16, 0)
    assert src.split_size("train") == len(range(0, FRAMES - 3, 8))
    for i in range(src.split_size("train")):
        s = src.sentence("train", i)
        assert all(np.array_equal(x, videos[path][n]) for x, n in zip(s.images, s.meta["frames"], strict=True))
