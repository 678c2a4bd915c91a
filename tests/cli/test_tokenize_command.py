"""`python main.py tokenize`: each split of the data into `<output_dir>/<split>` as `predict` writes it, resumable."""

from __future__ import annotations

import pytest

from datamodules.tokens import TokenDataModule

SMALL = [
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--data.init_args.max_images=4",
    "--data.init_args.source.init_args.splits={train: 6, val: 3, test: 0}",
]


@pytest.fixture()
def tokenize(main_py, repo_root, tiny_assets):
    """`python main.py tokenize` of the tiny VQGAN on tiny built-in data, with `extra` arguments."""

    def run(*extra: str):
        cfg = [
            a for name in ("vqgan/tiny.yaml", "data/builtin.yaml") for a in ("-c", str(repo_root / "configs" / name))
        ]
        return main_py(["tokenize", *cfg, "--ckpt_path", str(tiny_assets["vqgan_ckpt"]), *SMALL, *extra])

    return run


@pytest.mark.slow
def test_tokenizes_every_split_the_data_has_and_resumes(tokenize, tmp_path):
    out = tokenize("--output_dir", str(tmp_path / "tokens"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["train", "val"]  # test has no sentences
    data = TokenDataModule(train=str(tmp_path / "tokens/train"), val=str(tmp_path / "tokens/val"))
    assert [sum(shard["sentences"] for m in data.manifests[s] for shard in m.shards) for s in ("train", "val")] == [
        6,
        3,
    ]
    before = {p: p.read_bytes() for p in (tmp_path / "tokens").rglob("*") if p.is_file() and p.suffix != ".lock"}
    again = tokenize("--output_dir", str(tmp_path / "tokens"))
    assert again.returncode == 0, again.stderr
    assert "9 units" not in again.stderr and "are done" in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_splits_picks_the_splits(tokenize, tmp_path):
    out = tokenize("--output_dir", str(tmp_path / "tokens"), "--splits", "val")
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == ["val"]


@pytest.mark.parametrize(("args", "named"), [(["--splits", "dev"], "'dev'"), (["--ckpt_path", "nope.ckpt"], "nope")])
def test_bad_input_is_one_error_line(tokenize, tmp_path, args, named):
    out = tokenize("--output_dir", str(tmp_path / "tokens"), *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and named in lines[-1], out.stderr
    assert not (tmp_path / "tokens").exists()
