"""WebDataset-style tar shards (what img2dataset and video2dataset write): each split a list of shard URLs (local
paths, globs, brace ranges, `s3://`, `gs://`, `https://`), read as a stream, each rank x worker opening only its shards.

A sample is the members sharing a key (`<key>.<ext>`, webdataset's rule). Sentences are stored either way:
- one sample per sentence: several images (`<key>.0.png`, `<key>.1.png`, ...) or one video (`<key>.mp4`), and an
  optional `<key>.json` whose `kind` tags it;
- one sample per image: `<key>.jpg` with a `<key>.json` sidecar holding the sentence key and frame index
  (`{"sentence": "s42", "frame": 3}`) or a `<key>.txt` of exactly `s42 3`; consecutive samples of a sentence in a
  shard form it, in frame order. (Any other `.txt`, e.g. img2dataset's captions, is not read.)
A lone image without a sentence key is a single-image sentence. The sidecar's other fields go into the sentence's
`meta` (`family`, for one, groups evaluation results).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator

import numpy as np

from datamodules.imageio import IMAGE_EXTENSIONS, BadImage, load_rgb
from datamodules.sources.base import SPLITS, Indexed, SentenceSource, VisualSentence, WorkUnit
from datamodules.sources.remote import check_url, expand_urls, open_url, remote_error
from datamodules.sources.video import VIDEO_EXTENSIONS
from lvm_pl.console import UserError, say, warn
from lvm_pl.kinds import KINDS

IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
VIDEO_EXTS = {e.lstrip(".") for e in VIDEO_EXTENSIONS} - {"gif"}  # a GIF member is read as an image (its 1st frame)
SHARD_STRIDE = 1 << 32  # a sentence's index: its shard's number in the split x 2^32 + its position in the shard


def _frame_number(ext: str) -> list:
    """`2.jpg` before `10.jpg`: the sort key of an image member's extension."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", ext)]


def decode_video(data: bytes) -> list[np.ndarray]:
    """Every frame of an in-memory video member, uint8 [H, W, 3] each (a sample's video is one sentence)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


class TarSource(SentenceSource):
    """Sentences streamed from tar shards; `train`/`val`/`test` each a URL, pattern or list of them (None: none).

    `sentence_key`/`frame_key` name the JSON sidecar's fields of one-sample-per-image shards; `kind` tags sentences
    whose sidecar says none. Undecodable members are skipped and counted per shard, or fail naming shard and member
    with `strict`. `shuffle_buffer`/`epoch_length`: see `SentenceSource`. `storage_options`: fsspec options per
    protocol (`{s3: {config_kwargs: {connect_timeout: 5}}}`); credentials come from the environment only.
    """

    streaming = True

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        kind: str = "sequence",
        sentence_key: str = "sentence",
        frame_key: str = "frame",
        shuffle_buffer: int = 100,
        epoch_length: int | None = None,
        strict: bool = False,
        storage_options: dict[str, dict] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"data.source.kind: {kind!r} is not one of {list(KINDS)}")
        if shuffle_buffer < 1 or (epoch_length is not None and epoch_length < 1):
            raise UserError(f"data.source: shuffle_buffer={shuffle_buffer}, epoch_length={epoch_length} must be >= 1")
        self.patterns = {"train": train or [], "val": val or [], "test": test or []}
        self.kind, self.sentence_key, self.frame_key = kind, sentence_key, frame_key
        self.shuffle_buffer, self.epoch_length, self.strict = shuffle_buffer, epoch_length, strict
        self.options = storage_options or {}
        self.urls: dict[str, list[str]] = {}
        self.image_size = 0

    def setup(self, image_size: int, seed: int) -> None:
        """Expand each split's shard list (names only; no shard is read) and check that its first shard is there."""
        self.image_size = image_size
        self.urls = {split: expand_urls(self.patterns[split], self.options) for split in SPLITS}
        if not any(self.urls.values()):
            raise UserError("data.source: no shards given (set train, val and/or test to shard URLs)")
        for urls in self.urls.values():
            if urls:
                check_url(urls[0], self.options)  # a wrong endpoint, bucket or credentials fail here, not in a worker
        say("tar shards: " + ", ".join(f"{s} {len(u)}" for s, u in self.urls.items()))

    def shards(self, split: str) -> list[str]:
        """The shard URLs of `split`, in the order given."""
        return self.urls.get(split, [])

    def has_sentences(self, split: str) -> bool:
        return bool(self.shards(split))

    def stream(self, split: str, part: int, parts: int, shuffle: list[int] | None = None) -> Iterator[Indexed]:
        """Sentences of shards `part::parts` of the split (webdataset's split by node and worker), in their stored
        order or with the shards permuted by the seed `shuffle`."""
        mine = np.arange(part, len(self.shards(split)), parts)
        for n in mine if shuffle is None else np.random.default_rng(shuffle).permutation(mine):
            for position, sentence in self.shard_sentences(self.shards(split)[n]):
                yield int(n) * SHARD_STRIDE + position, sentence

    def shard_sentences(self, url: str) -> Iterator[Indexed]:
        """The sentences of one shard in stored order, each with its position in the shard."""
        skipped: list[str] = []
        frames: list[tuple[int, int, np.ndarray]] = []  # (frame, member order, image) of the sentence being gathered
        current, first_meta, count = None, {}, 0

        def gathered() -> VisualSentence:
            images = [image for _, _, image in sorted(frames, key=lambda f: f[:2])]
            return self._sentence(images, first_meta, url, str(current))

        for sample in self._samples(url):
            name = f"{url}#{sample['__key__']}"
            meta = self._sidecar(sample, name, skipped)
            images = self._images(sample, name, skipped) if meta is not None else []
            meta = meta or {}
            key = meta.pop(self.sentence_key, None)
            if key is not None and key != current and frames:
                yield count, gathered()
                count, frames = count + 1, []
            if key is not None:  # one sample per image: it joins sentence `key` at its frame
                frame = meta.pop(self.frame_key, len(frames))
                if not isinstance(frame, int):
                    raise UserError(f"{name}: {self.frame_key}={frame!r} is not a frame number")
                if not frames:
                    current, first_meta = key, meta
                frames += [(frame, len(frames), image) for image in images]
                continue
            if frames:
                yield count, gathered()
                count, frames, current = count + 1, [], None
            if images:
                yield count, self._sentence(images, meta, url, sample["__key__"])
                count += 1
        if frames:
            yield count, gathered()
        if skipped:
            warn(f"{url}: skipped {len(skipped)} unreadable members, e.g. {skipped[0]}")

    def _sentence(self, images: list[np.ndarray], meta: dict, url: str, key: str) -> VisualSentence:
        kind = meta.pop("kind", "single" if len(images) == 1 else self.kind)
        return VisualSentence(images, kind, {**meta, "url": url, "key": key})

    def _samples(self, url: str) -> Iterator[dict]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        with open_url(url, self.options) as stream:
            try:
                yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            except (tarfile.TarError, ValueError, EOFError) as err:  # webdataset appends " @ <stream>" to the text
                problem = str(err.args[0] if err.args else err).split(" @ ")[0]
                raise UserError(f"{url}: corrupt tar shard ({type(err).__name__}: {problem})") from None
            except OSError as err:  # the connection lost mid-shard, among others
                raise remote_error(url, err) from None

    def _sidecar(self, sample: dict, name: str, skipped: list[str]) -> dict | None:
        """The sample's JSON or TXT sidecar as a dict (`{}`: none); None when it is unreadable (skip the sample)."""
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._bad(f"{name}.json", err, skipped)
                return None
            if not isinstance(meta, dict):
                raise UserError(f"{name}.json: expected a JSON object")
        elif "txt" in sample and re.fullmatch(rb"\s*\S+\s+-?\d+\s*", sample["txt"]):
            key, frame = sample["txt"].decode("utf-8", "replace").split()
            meta = {self.sentence_key: key, self.frame_key: int(frame)}
        else:
            return {}
        if meta.get("kind", "sequence") not in KINDS:
            raise UserError(f"{name}: kind {meta['kind']!r} is not one of {list(KINDS)}")
        return meta

    def _images(self, sample: dict, name: str, skipped: list[str]) -> list[np.ndarray]:
        videos = [ext for ext in sample if ext.rsplit(".", 1)[-1] in VIDEO_EXTS]
        if videos:
            try:
                return decode_video(sample[videos[0]])
            except Exception as err:  # noqa: BLE001 - PyAV raises many types for broken files
                return self._bad(f"{name}.{videos[0]}", err, skipped)
        images = []
        for ext in sorted((e for e in sample if e.rsplit(".", 1)[-1] in IMAGE_EXTS), key=_frame_number):
            try:
                images.append(load_rgb(io.BytesIO(sample[ext]), min_side=self.image_size or None))
            except BadImage as err:
                self._bad(f"{name}.{ext}", err, skipped)
        return images

    def _bad(self, member: str, err: Exception, skipped: list[str]) -> list:
        if self.strict:
            raise UserError(f"{member}: unreadable member ({str(err).split(': ', 1)[-1]}) (strict: true)")
        skipped.append(member)
        return []

    def work_units(self, split: str, sentences_per_unit: int = 0) -> list[WorkUnit]:
        """One unit per input shard (its position in the split's list names it)."""
        return [WorkUnit(split, f"{split}-{i:06d}", url=url) for i, url in enumerate(self.shards(split))]

    def unit_sentences(self, unit: WorkUnit) -> Iterator[Indexed]:
        """The sentences of the unit's shard in stored order, each with its position in the shard."""
        return self.shard_sentences(unit.url)

    def _no_index(self, split: str) -> UserError:
        return UserError(
            f"data.source: tar shards are streamed and have no sentence index ({split}); this command needs an indexed"
            " source (folder, builtin)"
        )

    def split_size(self, split: str) -> int:
        raise self._no_index(split)

    def num_images(self, split: str, index: int) -> int:
        raise self._no_index(split)

    def sentence(self, split: str, index: int) -> VisualSentence:
        raise self._no_index(split)

    def describe(self, split: str, index: int) -> str:
        shard, position = divmod(index, SHARD_STRIDE)
        return f"{self.shards(split)[shard]}, sentence {position}"
