"""Prompts from YAML/JSONL files, folders and the built-in source; predict end to end into PNG files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import GreyTokenizer, cpu_trainer
from PIL import Image
from torch import nn

from callbacks.image_writer import ImageWriter
from datamodules.prompts import PromptDataModule, collate_prompts, split_sentence
from datamodules.sources.builtin import BuiltinSource
from lvm_pl import images as image_utils
from lvm_pl.batches import PromptBatch
from lvm_pl.console import UserError
from lvm_pl.images import BAND
from lvm_pl.lvm.generation import GenerationSettings
from lvm_pl.lvm.module import LVM
from lvm_pl.lvm.settings import OptimSettings
from lvm_pl.tokens import TokenLayout


def write_images(folder: Path, names: list[str], size: int = 20) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((size, size + 4, 3), 10 * i, np.uint8)).save(folder / name)
    return names


def batch_of(dm: PromptDataModule) -> PromptBatch:
    batch = next(iter(dm.predict_dataloader()))
    assert isinstance(batch, PromptBatch)
    return batch


def test_yaml_file_prompts_resolve_paths_kinds_and_frames(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png", "d.png"])
    entries = [
        {"images": ["imgs/a.png", "imgs/b.png"], "truth": ["imgs/c.png"], "name": "walk"},
        {"images": ["imgs/a.png", "imgs/b.png", "imgs/c.png"], "kind": "analogy"},
        {"images": ["imgs/d.png"], "kind": "category", "num_frames": 3},
    ]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"prompts": entries}))
    dm = PromptDataModule(file=str(tmp_path / "p.yaml"), num_frames=2, image_size=16, batch_size=3)
    dm.setup()
    assert [(p.name, p.kind, p.num_frames, len(p.images), len(p.truth)) for p in dm.prompts] == [
        ("walk", "sequence", 2, 2, 1),
        ("00001_analogy", "analogy", 1, 3, 0),
        ("00002_category", "category", 3, 1, 0),
    ]
    batch = batch_of(dm)
    assert batch.prompt.shape == (3, 3, 3, 16, 16) and batch.truth.shape == (3, 1, 3, 16, 16)
    assert batch.num_prompt.tolist() == [2, 3, 1] and batch.num_truth.tolist() == [1, 0, 0]
    assert batch.num_frames.tolist() == [2, 1, 3] and batch.kinds == ["sequence", "analogy", "category"]
    assert batch.names == ["walk", "00001_analogy", "00002_category"] and batch.index.tolist() == [0, 1, 2]
    assert batch.prompt.min() >= -1 and batch.prompt.max() <= 1
    assert (batch.prompt[2, 1:] == 0).all()  # padding past a prompt's images


def test_jsonl_file_prompts(tmp_path):
    write_images(tmp_path, ["x.png", "y.png"])
    lines = [json.dumps({"images": ["x.png"], "truth": ["y.png"]}), "", json.dumps({"images": ["y.png", "x.png"]})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    dm = PromptDataModule(file=str(tmp_path / "p.jsonl"), image_size=16)
    dm.setup()
    assert [len(p.images) for p in dm.prompts] == [1, 2] and dm.prompts[0].truth == [str(tmp_path / "y.png")]


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"images": ["missing.png"]}, r"p.yaml prompt 0: images file .*missing.png does not exist"),
        ({"images": []}, "non-empty list `images`"),
        ({"images": ["a.png"], "kind": "single"}, "kind='single'"),
        ({"images": ["a.png"], "num_frames": 0}, "num_frames=0"),
        ({"images": ["a.png"], "truth": "a.png"}, "`truth` must be a list"),
    ],
)
def test_bad_file_entries_name_the_file_and_entry(tmp_path, entry, match):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([entry]))
    with pytest.raises(UserError, match=match):
        PromptDataModule(file=str(tmp_path / "p.yaml")).setup()


def test_exactly_one_origin_and_unreadable_image_named(tmp_path):
    with pytest.raises(UserError, match="exactly one of"):
        PromptDataModule()
    with pytest.raises(UserError, match="exactly one of"):
        PromptDataModule(file="a.yaml", folder="b")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([{"images": ["bad.png"]}]))
    dm = PromptDataModule(file=str(tmp_path / "p.yaml"), image_size=16)
    with pytest.raises(UserError, match="bad.png"):
        batch_of(dm)


def test_folder_prompts_in_natural_order_with_truth(tmp_path):
    write_images(tmp_path / "clip" / "truth", ["t.png"])
    write_images(tmp_path / "clip", ["f10.png", "f2.png", "f1.png"])
    write_images(tmp_path / "other", ["a.png"])
    (tmp_path / "empty").mkdir()
    dm = PromptDataModule(folder=str(tmp_path), num_frames=3, image_size=16)
    dm.setup()
    assert [p.name for p in dm.prompts] == ["clip", "other"]
    assert [Path(x).name for x in dm.prompts[0].images] == ["f1.png", "f2.png", "f10.png"]
    assert [Path(x).name for x in dm.prompts[0].truth] == ["t.png"] and dm.prompts[1].num_frames == 3


def test_split_sentence_by_kind():
    assert split_sentence([1, 2, 3, 4], "sequence", 2) == ([1, 2], [3, 4])
    assert split_sentence([1, 2], "sequence", 5) == ([1], [2])
    assert split_sentence([1, 2, 3, 4], "analogy", 3) == ([1, 2, 3], [4])
    assert split_sentence([1, 2, 3], "category", 1) == ([1, 2], [3])
    assert split_sentence([1], "sequence", 1) is None and split_sentence([1], "single", 1) is None


def test_builtin_held_out_sentences_become_prompts_with_their_ground_truth():
    source = BuiltinSource(splits={"train": 0, "val": 24, "test": 0})
    dm = PromptDataModule(source=source, split="val", num_frames=2, image_size=16, batch_size=64)
    dm.setup()
    kinds = {p.kind for p in dm.prompts}
    assert kinds <= {"sequence", "analogy", "category"} and len(kinds) >= 2
    whole = {i: source.sentence("val", i) for i in range(24)}
    for p in dm.prompts:
        index = int(p.name[3:8])
        full = whole[index].images
        assert len(p.images) + len(p.truth) == len(full) and p.num_frames == len(p.truth)
        assert p.num_frames == (1 if p.kind == "analogy" else min(2, len(full) - 1))
        assert all(np.array_equal(a, b) for a, b in zip(p.images + p.truth, full, strict=True))
    assert len(dm.prompts) == sum(s.kind != "single" for s in whole.values())
    only = PromptDataModule(source=source, split="val", kind="analogy", limit=2, image_size=16)
    only.setup()
    assert [p.kind for p in only.prompts] == ["analogy", "analogy"]


def test_collate_pads_prompts_and_missing_truth():
    items = [
        {"prompt": torch.ones(2, 3, 4, 4), "truth": None, "num_frames": 1, "kind": "sequence", "name": "a", "index": 0},
        {
            "prompt": torch.ones(1, 3, 4, 4),
            "truth": torch.ones(3, 3, 4, 4),
            "num_frames": 2,
            "kind": "x",
            "name": "b",
            "index": 1,
        },
    ]
    batch = collate_prompts(items)
    assert batch.prompt.shape == (2, 2, 3, 4, 4) and batch.truth.shape == (2, 3, 3, 4, 4)
    assert batch.num_truth.tolist() == [0, 3] and (batch.truth[0] == 0).all()
    assert batch.kinds == ["sequence", "x"] and batch.names == ["a", "b"] and batch.num_frames.tolist() == [1, 2]


def test_predict_writes_a_grid_per_prompt_and_a_png_per_frame(tmp_path):
    size, layout = 16, TokenLayout(codebook_size=16, tokens_per_image=16, num_special=4)
    module = LVM(
        generation=GenerationSettings(temperature=1.0, top_k=8, num_candidates=2, max_context_frames=3),
        preset="tiny",
        overrides={"n_embd": 32, "n_layer": 1, "n_head": 2, "intermediate_size": 64, "block_size": 128},
        layout=layout.to_dict(),
        tokenizer="fake.ckpt",
    )
    object.__setattr__(module, "tokenizer", GreyTokenizer(layout.codebook_size))  # as load_tokenizer would
    source = BuiltinSource(splits={"train": 0, "val": 6, "test": 0}, sequence_length=(2, 5), category_size=(2, 3))
    dm = PromptDataModule(source=source, num_frames=2, image_size=size, batch_size=4)
    writer = ImageWriter(output_dir=str(tmp_path / "out"))
    trainer = cpu_trainer(callbacks=[writer])
    trainer.predict(module, datamodule=dm, return_predictions=False)

    prompts = dm.prompts
    grids = sorted((tmp_path / "out").glob("*.png"))
    assert [g.stem for g in grids] == sorted(p.name for p in prompts)
    frames = sorted((tmp_path / "out").glob("*/c*_f*.png"))
    assert len(frames) == 2 * sum(p.num_frames for p in prompts) == writer.written["frames"]
    assert all(Image.open(f).size == (size, size) for f in frames)
    cell = size * 4  # 16 px frames shown at LABEL_CELL = 64 px so the headers fit
    for p in prompts:
        cols = len(p.images) + 1 + p.num_frames + (1 + len(p.truth) if p.truth else 0)
        grid = np.asarray(Image.open(tmp_path / "out" / f"{p.name}.png").convert("RGB"))
        bare = (2 * (cell + 2) + 2, cols * (cell + 2) + 2)  # two candidates' rows
        assert grid.shape[:2] == (bare[0] + 2 * BAND, bare[1])  # a header band above, a caption band below
        header, caption = grid[:BAND], grid[-BAND:]
        assert header.min() < 128 and caption.min() < 128  # text drawn in both bands
        starts = {"prompt 1": 0, "generated": len(p.images) + 1, "truth": len(p.images) + p.num_frames + 2}
        for text, column in starts.items():  # each header's text starts above its column
            x = 2 + column * (cell + 2)
            assert header[:, x : x + cell // 2].min() < 128, text
    assert not list((tmp_path / "out").rglob("*.tmp"))  # atomic writes leave no temporaries


class CLIPromptingLVM(LVM):
    """The LVM whose `tokenizer` path loads the fake 4x tokenizer (no VQGAN checkpoint in unit tests)."""

    def _load_tokenizer(self) -> GreyTokenizer:
        if self.tokenizer is None:
            object.__setattr__(self, "tokenizer", GreyTokenizer(16))
        return self.tokenizer


def generate_yaml(repo_root: Path, tmp_path: Path) -> str:
    """configs/generate.yaml with its model class swapped for `CLIPromptingLVM` (same init args plus the fake
    tokenizer); the swap is in the file because the CLI checks a config's keys against the class it names."""
    config = yaml.safe_load((repo_root / "configs/generate.yaml").read_text())
    config["model"]["class_path"] = "test_prompts.CLIPromptingLVM"
    config["model"]["init_args"]["tokenizer"] = "fake"
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "generate.yaml")


def test_generate_yaml_predicts_through_the_cli(repo_root, tmp_path):
    from main import cli

    args = ["predict", "-c", generate_yaml(repo_root, tmp_path)]
    args += ["--model.init_args.overrides", '{"n_embd": 32, "n_layer": 1, "n_head": 2, "block_size": 160}']
    args += ["--data.init_args.limit", "3", "--data.init_args.image_size", "16", "--trainer.accelerator", "cpu"]
    args += ["--data.init_args.source.init_args.splits", '{"train": 0, "val": 8, "test": 0}']
    args += ["--trainer.callbacks.init_args.output_dir", str(tmp_path / "gen")]
    run = cli(args)
    assert run.model.generation == GenerationSettings(1.0, 100, None, 2, 15, 0, False)
    assert run.model.layout.tokens_per_image == 16 and run.model.config.vocab_size == 116
    assert len(list((tmp_path / "gen").glob("*.png"))) == 3
    assert list(Path("runs/generate").rglob("events.out.tfevents.*"))  # grids logged to TensorBoard


@pytest.mark.parametrize("name", ["prompts_file.yaml", "prompts_folder.yaml"])
def test_prompt_data_configs_compose_with_generate_yaml(repo_root, tmp_path, name):
    from main import cli

    write_images(tmp_path / "prompts" / "clip", ["a.png", "b.png"])
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump([{"images": ["prompts/clip/a.png"]}]))
    args = ["predict", "-c", generate_yaml(repo_root, tmp_path), "-c", str(repo_root / "configs/data" / name)]
    args += ["--model.init_args.overrides", '{"n_embd": 32, "n_layer": 1, "n_head": 2, "block_size": 160}']
    args += ["--data.init_args.image_size", "16", "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    run = cli(args)
    assert [len(p.images) for p in run.datamodule.prompts] == ([1] if name == "prompts_file.yaml" else [2])
    assert len(list(Path("generated").glob("*.png"))) == 1


class PaletteTokenizer(nn.Module):
    """A viewable stand-in for the VQGAN: each 4x4 patch's mean colour -> one of 4^3 = 64 palette colours."""

    codebook_size, downsample_factor, levels = 64, 4, 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        rgb = nn.functional.avg_pool2d(images, 4)  # [B, 3, h, w] in [-1, 1]
        q = ((rgb + 1) / 2 * (self.levels - 1)).round().long().clamp(0, self.levels - 1)
        return q[:, 0] * self.levels**2 + q[:, 1] * self.levels + q[:, 2]  # [B, h, w]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        q = torch.stack([indices // self.levels**2, indices // self.levels % self.levels, indices % self.levels], 1)
        return nn.functional.interpolate(q.float() / (self.levels - 1) * 2 - 1, scale_factor=4)  # [B, 3, H, W]


class PaletteLVM(LVM):
    def _load_tokenizer(self) -> PaletteTokenizer:
        if self.tokenizer is None:
            object.__setattr__(self, "tokenizer", PaletteTokenizer())
        return self.tokenizer


@pytest.mark.slow
def test_tiny_lvm_trained_on_builtin_sequences_continues_one_into_a_png(tmp_path):
    """Fit a tiny LVM on built-in moving-shape sequences (tokenized on the fly), then continue held-out ones: the
    generated frame must be closer to the true next frame than the other sentences' next frames are."""
    from datamodules.sentences import VisualSentenceDataModule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-row decode steps: extra threads only wait on each other
    try:
        torch.manual_seed(0)
        source = dict(weights={"moving": 1.0}, sequence_length=(4, 6))
        module = PaletteLVM(
            generation=GenerationSettings(temperature=0, max_context_frames=15),
            preset="tiny",
            overrides={"n_embd": 96, "n_layer": 3, "n_head": 4, "intermediate_size": 256, "block_size": 128},
            tokenizer="palette",
            optim=OptimSettings(lr=3e-3, warmup_steps=20),
        )
        train = VisualSentenceDataModule(
            BuiltinSource(splits={"train": 512, "val": 0, "test": 0}, **source), 16, "sentence", batch_size=8
        )
        fit = cpu_trainer(max_steps=300)
        fit.fit(module, datamodule=train)
        prompts = PromptDataModule(
            source=BuiltinSource(splits={"train": 0, "val": 6, "test": 0}, **source), num_frames=1, image_size=16
        )
        writer = ImageWriter(output_dir=str(tmp_path / "out"))
        cpu_trainer(callbacks=[writer]).predict(module, prompts, return_predictions=False)
    finally:
        torch.set_num_threads(threads)
    generated = [np.asarray(Image.open(tmp_path / "out" / p.name / "c0_f0.png"), float) for p in prompts.prompts]
    truth = [fit_truth(p.truth[0]) for p in prompts.prompts]
    own = np.mean([np.abs(g - t).mean() for g, t in zip(generated, truth, strict=True)])
    other = np.mean([np.abs(g - t).mean() for i, g in enumerate(generated) for j, t in enumerate(truth) if i != j])
    assert own < 0.5 * other, (own, other)


def fit_truth(image: np.ndarray) -> np.ndarray:
    """A ground-truth frame as the palette tokenizer would reproduce it (the best any generation can do)."""
    tok = PaletteTokenizer()
    return image_utils.to_uint8(tok.decode(tok.encode(image_utils.to_tensor(image)[None])))[0].astype(float)
