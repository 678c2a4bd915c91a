"""Videos (extra `video`, PyAV): each file is cut into sentences of `length` frames, one every `stride` frames.

Frame counts come from the container (no decoding); a clip is decoded from the keyframe at or before its first frame
(an exact seek: frames are told apart by their timestamps), so reading a clip costs at most a keyframe interval more
than its own frames, wherever it is in the file.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from datamodules.sources.base import SentenceSource, VisualSentence, partition
from lvm_pl.console import UserError, progress, say, warn

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


def _open(path: Path):
    try:
        import av
    except ImportError:
        raise UserError("the video source needs PyAV: pip install 'lvm-pl[video]'") from None
    return av.open(str(path))


def count_frames(path: Path) -> int:
    """Number of video frames in `path`: the container's count, else the stream's duration times its frame rate,
    else the number of its packets (demuxed, not decoded: one packet per frame)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        if stream.duration and stream.average_rate:
            return round(stream.duration * stream.time_base * stream.average_rate)
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_clip(path: Path, frames: range) -> tuple[list[np.ndarray], int]:
    """Frames `frames` of `path` as RGB [H, W, 3] arrays, and how many frames were decoded to get them.

    Seeks to the keyframe at or before the first frame and decodes forward, numbering frames by timestamp; a file
    whose timestamps do not number its frames one by one (variable frame rate, none at all) is decoded from its start
    and numbered in decoding order, which is what `count_frames` counts.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        if rate and base and frames.start > 0:
            container.seek(start + math.floor(frames.start / (rate * base)), stream=stream, backward=True)
            got, decoded = _decode_by_timestamp(container, stream, frames, start, rate * base)
            if got is not None:
                return got, decoded
            container.seek(0, stream=stream, backward=True)
        else:
            decoded = 0
        got = []
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if i in frames:
                got.append(frame.to_ndarray(format="rgb24"))
            if i >= frames[-1]:
                break
        return got, decoded


def _decode_by_timestamp(container, stream, frames: range, start: int, per_tick: Fraction) -> tuple[list | None, int]:
    """Decode forward from where the container was sought to, keeping the frames whose timestamps number `frames`;
    None (with the frames decoded so far) when the numbers are not consecutive or the seek went past the first."""
    got, numbers, decoded, previous = [], [], 0, None
    for frame in container.decode(stream):
        decoded += 1
        if frame.pts is None:
            return None, decoded
        number = round((frame.pts - start) * per_tick)
        if (previous is None and number > frames.start) or (previous is not None and number != previous + 1):
            return None, decoded
        previous = number
        if number in frames:
            got.append(frame.to_ndarray(format="rgb24"))
            numbers.append(number)
        if number >= frames[-1]:
            break
    return (got if numbers == list(frames) else None), decoded


class VideoSource(SentenceSource):
    """Frame sequences from video files under `root` (or one file). Frames `start, start+frame_step, ...` form a
    sentence of `length` images; starts advance by `stride`. Windows are split train/val/test by a seeded hash."""

    def __init__(
        self,
        root: str,
        length: int = 16,
        stride: int = 16,
        frame_step: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        strict: bool = False,
    ) -> None:
        if length < 1 or stride < 1 or frame_step < 1:
            raise UserError(f"data.source: length={length}, stride={stride}, frame_step={frame_step} must be >= 1")
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise UserError(f"data.source: val_fraction={val_fraction}, test_fraction={test_fraction} must sum to < 1")
        self.root, self.length, self.stride, self.frame_step = Path(root), length, stride, frame_step
        self.val_fraction, self.test_fraction, self.strict = val_fraction, test_fraction, strict
        self.windows: list[tuple[Path, int]] = []
        self.splits: dict[str, list[int]] = {}

    def setup(self, image_size: int, seed: int) -> None:
        if self.root.is_file():
            files = [self.root]
        elif self.root.is_dir():
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            raise UserError(f"data.source.root: {self.root} does not exist")
        if not files:
            raise UserError(f"data.source.root: no video files ({', '.join(VIDEO_EXTENSIONS)}) under {self.root}")
        span = (self.length - 1) * self.frame_step + 1
        windows, bad = [], []
        for path in progress(files, f"counting frames of {len(files)} videos"):
            try:
                frames = count_frames(path)
            except Exception as err:  # PyAV raises many error types for broken files
                if self.strict:
                    raise UserError(f"{path}: unreadable video ({err}); remove it or set strict: false") from None
                bad.append(path)
                continue
            if frames < span:
                raise UserError(f"{path}: {frames} frames, fewer than one sentence needs ({span}); lower length")
            windows += [(path, s) for s in range(0, frames - span + 1, self.stride)]
        if bad:
            warn(f"{self.root}: skipped {len(bad)} unreadable videos, e.g. {bad[0]}")
        if not windows:
            raise UserError(f"data.source.root: no readable videos under {self.root}")
        self.windows = windows
        self.splits = partition([f"{p}#{s}" for p, s in windows], seed, self.val_fraction, self.test_fraction)
        say(f"video {self.root}: {len(files) - len(bad)} files, {len(windows)} sentences of {self.length} frames")

    def split_size(self, split: str) -> int:
        return len(self.splits.get(split, []))

    def num_images(self, split: str, index: int) -> int:
        return self.length

    def sentence(self, split: str, index: int) -> VisualSentence:
        path, start = self.windows[self.splits[split][index]]
        wanted = range(start, start + self.length * self.frame_step, self.frame_step)
        frames, _ = read_clip(path, wanted)
        if len(frames) != self.length:
            raise UserError(f"{path}: expected frames {start}..{wanted[-1]}, decoded {len(frames)}")
        return VisualSentence(frames, "sequence", {"path": str(path), "frames": list(wanted)})

    def describe(self, split: str, index: int) -> str:
        path, start = self.windows[self.splits[split][index]]
        return f"{path} from frame {start}"
