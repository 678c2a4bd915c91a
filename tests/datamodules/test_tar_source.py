"""Tar shards (datamodules/sources/tar.py): `main.py make-shards` from the built-in data and back through `TarSource`
in both layouts, over HTTP, the split by rank x worker, tokenizing tar shards through the CLI, shards on moto's S3
server (tests/s3_server.py), and the storage faults, each one line naming the URL with nothing partial left."""

from __future__ import annotations

import io
import json
import tarfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import numpy as np
import pytest
from helpers import config
from PIL import Image
from s3_server import free_port
from torch.utils.data import DataLoader

from datamodules.make_shards import add_member
from datamodules.preview import load_datamodule
from datamodules.sentence_stream import SentenceStream
from datamodules.sentences import VisualSentenceDataModule
from datamodules.sources.tar import SHARD_STRIDE, TarSource
from lvm_pl.console import UserError

BUILTIN = [config("data/builtin.yaml")]
SMALL = ["--data.init_args.image_size=16", "--data.init_args.source.init_args.splits={train: 5, val: 2, test: 0}"]
SOURCE = "--data.init_args.source.init_args"
NO_EVAL = [f"{SOURCE}.val=[]", f"{SOURCE}.test=[]"]  # on the command line `null` reads as "None"


def contents(dm: VisualSentenceDataModule, split: str) -> list[tuple]:
    """What a sentence is to the model and to evaluation: kind, family and pixels."""
    return [(s.kind, s.meta.get("family"), np.stack(s.images)) for s in dm.sentences(split)]


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) > 0
    for (kind_a, family_a, pixels_a), (kind_b, family_b, pixels_b) in zip(a, b, strict=True):
        assert (kind_a, family_a) == (kind_b, family_b)
        np.testing.assert_array_equal(pixels_a, pixels_b)


def tar_data(train, val=None, unit: str = "sentence", **options) -> VisualSentenceDataModule:
    data = VisualSentenceDataModule(TarSource(train=train, val=val, **options), image_size=16, unit=unit, max_images=16)
    data.setup()
    return data


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    return path


def png(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def builtin_shards(tmp_path_factory, main_py) -> Path:
    """The small built-in data through `make-shards`, once per layout: `<root>/<layout>/<split>/shard-*.tar`."""
    root = tmp_path_factory.mktemp("tar")
    for layout in ("sentence", "image"):
        argv = ["make-shards", "-c", *BUILTIN, "--output_dir", str(root / layout), "--per_shard", "2", *SMALL]
        done = main_py([*argv, "--layout", layout], cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("layout", ["sentence", "image"])
def test_make_shards_then_tar_source_gives_the_sources_sentences(builtin_shards, layout):
    source = load_datamodule(BUILTIN, SMALL)
    root = builtin_shards / layout
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    shards = tar_data(f"{root}/train/shard-{{000000..000002}}.tar", f"{root}/val/*.tar")  # a brace range, a glob
    for split in ("train", "val"):
        assert_same(contents(source, split), contents(shards, split))


def test_shards_over_http(builtin_shards):
    handler = partial(SimpleHTTPRequestHandler, directory=str(builtin_shards / "sentence" / "train"))
    handler.log_message = lambda *args: None
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        local = tar_data(str(builtin_shards / "sentence" / "train" / "*.tar"))
        assert_same(contents(local, "train"), contents(tar_data(f"{base}/shard-{{000000..000002}}.tar"), "train"))
        with pytest.raises(UserError, match=rf"^{base}/shard-000007.tar: no such shard"):
            tar_data(f"{base}/shard-000007.tar")
        server.shutdown()


def test_parts_of_ranks_and_workers_hold_each_sentence_once(builtin_shards):
    data = tar_data(str(builtin_shards / "sentence" / "train" / "*.tar"))
    everything = [index for index, _ in data.source.stream("train", 0, 1)]
    assert [i // SHARD_STRIDE for i in everything] == [0, 0, 1, 1, 2]
    seen = []
    for rank in range(2):  # 2 ranks x 2 workers: 4 parts over 3 shards, one part empty
        stream = SentenceStream(data.source, "train", lambda i, s: [{"index": i}], rank=rank, world_size=2)
        seen += [item["index"] for item in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(seen) == everything
    batches = list(data.predict_dataloader())  # predict: one pass, sentences as the token writer takes them
    assert sorted(i for b in batches for i in b.index.tolist()) == everything


def test_training_stream_gives_epoch_length_items_in_an_order_by_epoch(builtin_shards):
    data = tar_data(str(builtin_shards / "image" / "train" / "*.tar"), unit="image", epoch_length=7, shuffle_buffer=4)
    stream = data.stream("train", shuffle=True)
    orders = []
    for epoch in (0, 0, 1):
        stream.epoch = epoch
        orders.append([item["image"].sum().item() for item in stream])
    assert len(orders[0]) == 7 and orders[0] == orders[1] and orders[0] != orders[2]


def test_sidecars_video_members_and_unreadable_members(tmp_path, tiny_assets):
    video = (tiny_assets["videos"] / "clip.mp4").read_bytes()
    members = {
        "a.png": png(10),
        "a.txt": b"s1 1",  # one sample per image, a TXT sidecar: frame 1 of sentence s1
        "b.png": png(20),
        "b.txt": b"s1 0",
        "c.png": png(30),
        "c.txt": b"a caption, not a sentence key",  # img2dataset's captions are not read
        "d.mp4": video,
        "d.json": json.dumps({"kind": "sequence", "family": "clip"}).encode(),
        "e.0.png": png(40),
        "e.1.png": b"not a png",
    }
    data = tar_data(str(write_tar(tmp_path / "mixed.tar", members)))
    with pytest.warns(UserWarning, match=r"mixed.tar: skipped 1 unreadable members, e.g. .*mixed.tar#e.1.png"):
        got = list(data.sentences("train"))
    assert [len(s.images) for s in got] == [2, 1, 12, 1]
    assert [int(s.images[0].mean()) for s in got[:2]] == [20, 30]  # s1 in frame order
    assert [s.kind for s in got] == ["sequence", "single", "sequence", "single"] and got[2].meta["family"] == "clip"


@pytest.mark.slow
def test_tokenize_tar_shards_through_the_cli(tiny_assets, tmp_path, main_py):
    tar = tiny_assets["tar"]  # the tiny image folder as make-shards writes it: 2 train, 1 val, 1 test sentences
    data = ["-c", config("data/tar.yaml"), f"{SOURCE}.test={tar}/test/shard-*.tar"]
    data += [f"{SOURCE}.train={tar}/train/shard-*.tar", f"{SOURCE}.val={tar}/val/shard-*.tar"]
    data += ["--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2"]
    tokenize = ["tokenize", "-c", config("vqgan/tiny.yaml"), *data, "--ckpt_path", tiny_assets["vqgan_ckpt"]]
    done = main_py([*tokenize, "--output_dir", tmp_path / "tokens", "--sentences_per_unit", "1"])  # tar: a unit a shard
    assert done.returncode == 0, done.stderr[-3000:]
    for split, sentences in (("train", 2), ("val", 1), ("test", 1)):
        counts = json.loads((tmp_path / "tokens" / split / "manifest.json").read_text())["counts"]
        assert (counts["sentences"], counts["images"]) == (sentences, 3 * sentences), split


def test_shards_on_s3_written_and_read_through_the_cli(builtin_shards, tmp_path, s3_server, main_py):
    url = s3_server.bucket("corpus") + "/builtin"
    argv = ["make-shards", "-c", *BUILTIN, "--output_dir", url, "--per_shard", "2", *SMALL]
    done = main_py(argv, env=s3_server.env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(s3_server.fs().ls("corpus/builtin/train")) == [
        f"corpus/builtin/train/shard-{i:06d}.tar" for i in range(3)
    ]
    again = main_py(argv, env=s3_server.env())  # a split that holds shards is never overwritten
    assert again.returncode == 2 and f"{url}/train: holds files already" in error_lines(again)[0]
    back = ["make-shards", "-c", config("data/tar.yaml"), f"{SOURCE}.train={url}/train/shard-*.tar", *NO_EVAL]
    done = main_py([*back, "--output_dir", tmp_path / "back"], env=s3_server.env())  # S3 glob, streamed reads
    assert done.returncode == 0, done.stderr[-3000:]
    local = builtin_shards / "sentence" / "train"
    assert_same(contents(tar_data(f"{local}/*.tar"), "train"), contents(tar_data(f"{tmp_path}/back/train/*"), "train"))


@pytest.mark.slow
def test_storage_faults_are_one_line_naming_the_url(
    builtin_shards, tmp_path, s3_server, s3_server_checking_credentials, main_py
):
    good = builtin_shards / "sentence" / "train" / "shard-000000.tar"
    bad = write_tar(tmp_path / "bad.tar", {"x.0.png": png(5), "x.1.png": b"\x89PNG garbage", "x.json": b"{}"})
    bucket = s3_server.bucket("tar-faults")
    s3_server.fs().put_file(str(good), "tar-faults/train/shard-000000.tar")
    strict = s3_server_checking_credentials
    strict.bucket("guarded")
    strict.fs().put_file(str(good), "guarded/train/shard-000000.tar")
    closed = f"http://127.0.0.1:{free_port()}"
    reads = {  # name: (shard URLs, the URL the error names, environment)
        "corrupt member": (f"[{good}, {bad}]", f"{bad}#x.1.png", s3_server.env()),
        "missing shard": (f"[{bucket}/train/shard-000000.tar, {bucket}/train/shard-000001.tar]", None, s3_server.env()),
        "unreachable": (f"{bucket}/train/shard-000000.tar", None, s3_server.env(AWS_ENDPOINT_URL=closed)),
        "credentials": ("s3://guarded/train/shard-000000.tar", None, strict.env(AWS_SECRET_ACCESS_KEY="wrong")),
    }
    runs = {}
    for name, (urls, _, env) in reads.items():
        argv = ["make-shards", "-c", config("data/tar.yaml"), f"{SOURCE}.train={urls}", *NO_EVAL]
        runs[name] = main_py([*argv, f"{SOURCE}.strict=true", "--output_dir", tmp_path / name], env=env)
    write = ["make-shards", "-c", *BUILTIN, *SMALL, "--output_dir", "s3://guarded/out"]  # writing with a wrong key
    runs["writing"] = main_py(write, env=strict.env(AWS_SECRET_ACCESS_KEY="wrong"))
    lenient = ["make-shards", "-c", config("data/tar.yaml"), f"{SOURCE}.train=[{good}, {bad}]", *NO_EVAL]
    skipped = main_py([*lenient, "--output_dir", tmp_path / "lenient"])  # strict: false
    named = [named or urls.strip("[]").split(", ")[-1] for urls, named, _ in reads.values()] + ["s3://guarded/out"]
    for (name, result), url in zip(runs.items(), named, strict=True):
        errors = error_lines(result)
        assert result.returncode == 2 and len(errors) == 1 and url in errors[0], (name, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, name
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir()), name  # nothing partial
    assert "access denied" in error_lines(runs["credentials"])[0]
    assert "cannot reach" in error_lines(runs["unreachable"])[0]
    assert strict.fs().ls("guarded") == ["guarded/train"]  # the failed upload left nothing
    assert skipped.returncode == 0 and "skipped 1 unreadable members" in skipped.stderr, skipped.stderr[-3000:]
    assert len(contents(tar_data(f"{tmp_path}/lenient/train/*.tar"), "train")) == 3  # good's 2 and x's good image
