"""Videos (extra `video`, PyAV): each file is cut into sentences of `length` frames, one every `stride` frames."""

from __future__ import annotations

from pathlib import Path

from datamodules.sources.base import SentenceSource, VisualSentence, partition
from lvm_pl.console import UserError, say, warn

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


def _open(path: Path):
    try:
        import av
    except ImportError:
        raise UserError("the video source needs PyAV: pip install 'lvm-pl[video]'") from None
    return av.open(str(path))


def count_frames(path: Path) -> int:
    """Number of video frames in `path` (container metadata when present, else by decoding)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(video=0))


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
        for path in files:
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
        frames = []
        with _open(path) as container:
            # decode from the start: exact frame numbers without relying on keyframe seeking (clips are short)
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= wanted[-1]:
                    break
        if len(frames) != self.length:
            raise UserError(f"{path}: expected frames {start}..{wanted[-1]}, decoded {len(frames)}")
        return VisualSentence(frames, "sequence", {"path": str(path), "frames": list(wanted)})

    def describe(self, split: str, index: int) -> str:
        path, start = self.windows[self.splits[split][index]]
        return f"{path} from frame {start}"
