import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TESTS, cpu_trainer, save_checkpoint
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import Dataset

from callbacks.token_writer import TokenWriter
from datamodules.sentences import collate_sentences
from datamodules.sources.base import WorkUnit, range_units
from datamodules.tokens import TokenDataModule
from datamodules.units import UnitSentences, unit_loader
from lvm_pl import shards
from lvm_pl.batches import SentenceBatch, TokenizedSentences
from lvm_pl.console import UserError
from lvm_pl.images import to_tensor
from lvm_pl.stage_data import StageData
from lvm_pl.tokens import TokenLayout

IMAGE_SIZE, F_DOWN, K = 8, 4, 16


class FakeTokenizer(LightningModule):
    """Stands in for the VQGAN: `encode` buckets each 4x4 patch's mean; `predict_step` follows the VQGAN contract."""

    codebook_size, downsample_factor = K, F_DOWN

    def __init__(self, fail_at_batch: int = -1, checkpoint: str | None = None):
        super().__init__()
        self.fail_at_batch, self.checkpoint = fail_at_batch, checkpoint
        self.encoded = []

    def encode(self, images):  # [B, 3, H, W] in [-1, 1] -> [B, h, w]
        pooled = F.avg_pool2d(images.mean(1, keepdim=True), F_DOWN)[:, 0]
        return ((pooled + 1) / 2 * K).long().clamp(0, K - 1)

    def predict_step(self, batch: SentenceBatch, batch_idx: int) -> TokenizedSentences:
        self.encoded += batch.index.tolist()
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("simulated crash")
        b, n = batch.images.shape[:2]
        tokens = self.encode(batch.images.flatten(0, 1)).unflatten(0, (b, n))  # [B, N, h, w]
        return TokenizedSentences(tokens, batch.num_images, batch.index, batch.kinds)


class _Sentences(Dataset):
    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        n = 1 + i % 3
        g = torch.Generator().manual_seed(i)
        images = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
        return {"images": images, "kind": f"kind{i % 2}", "index": i}  # as SentenceDataset's items


class FakeSentenceData(LightningDataModule, StageData):
    """Stands in for VisualSentenceDataModule(unit="sentence"): its `UnitBatch`es, `image_size`, `predict_split`."""

    layout, seq_len = None, None

    def __init__(self, count: int = 23, batch_size: int = 4, predict_split: str = "train"):
        super().__init__()
        self.count, self.batch_size, self.predict_split, self.image_size = count, batch_size, predict_split, IMAGE_SIZE
        self.units = None

    def work_units(self, split, sentences_per_unit):
        return range_units(split, self.count, sentences_per_unit)

    def predict_units(self, units, claims) -> None:
        self.units = (units, claims)

    def predict_dataloader(self):
        data = _Sentences(self.count)
        items = lambda unit: (data[i] for i in range(unit.start, unit.stop))  # noqa: E731
        dataset = UnitSentences(*self.units, items, self.batch_size, collate_sentences, IMAGE_SIZE)
        return unit_loader(dataset, num_workers=0)


class PlainSentenceData(FakeSentenceData):
    """Sentence data that does not cut a split into work units (StageData's defaults)."""

    work_units = StageData.work_units
    predict_units = StageData.predict_units


def _writer(out, sentences_per_unit=5, split="train") -> TokenWriter:
    return TokenWriter(str(out), sentences_per_unit, lease_s=60, split=split, num_special=4)


def _tokenize(out, fail_at_batch=-1, sentences_per_unit=5, checkpoint=None, **data):
    """Tokenize `FakeSentenceData(**data)` into `out`; returns the sentence indices the model encoded."""
    model = FakeTokenizer(fail_at_batch, checkpoint)
    trainer = cpu_trainer(callbacks=[_writer(out, sentences_per_unit)])
    data_class = data.pop("data_class", FakeSentenceData)
    trainer.predict(model, data_class(**data), return_predictions=False)
    return model.encoded


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_tokenize_shards_windows_reproduce_encode(tmp_path):
    ckpt = tmp_path / "tok.ckpt"
    ckpt.write_bytes(b"weights")
    _tokenize(tmp_path / "out", checkpoint=str(ckpt))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    layout = TokenLayout.from_dict(manifest["layout"])
    assert layout == TokenLayout(codebook_size=K, tokens_per_image=4, num_special=4)
    assert manifest["tokenizer"]["sha256"] == shards.sha256_file(ckpt)
    assert manifest["counts"]["sentences"] == 23 and manifest["counts"]["images"] == sum(1 + i % 3 for i in range(23))
    assert manifest["image_size"] == IMAGE_SIZE and manifest["counts"]["shards"] > 1
    # the documented layout, rebuilt from the tokenizer's own encode output
    model, data = FakeTokenizer(), _Sentences(23)
    expected = torch.cat([layout.sentence(model.encode(data[i]["images"])) for i in range(23)])
    dm = TokenDataModule(train=str(tmp_path / "out"), seq_len=16, batch_size=4, shuffle=False)
    dm.setup("fit")
    labels = torch.cat([b.labels for b in dm.train_dataloader()]).flatten()
    assert torch.equal(labels[labels != -100], expected[1:])
    kinds = [
        idx.kinds[k]
        for p in shards.complete_shards(tmp_path / "out")
        for idx in [shards.read_shard_index(p)]
        for k in idx.kind
    ]
    assert kinds == [f"kind{i % 2}" for i in range(23)]
    assert manifest["counts"]["shards"] == 5 and [s["name"] for s in manifest["shards"]] == [
        f"train-{u:06d}" for u in range(5)
    ]
    assert not list((tmp_path / "out").glob("*.claim")), "the claims go at the end"


def test_manifest_records_the_ckpt_path_checkpoint(tmp_path):
    save_checkpoint(FakeTokenizer(), tmp_path / "tok.ckpt")
    trainer = cpu_trainer(callbacks=[_writer(tmp_path / "out")])
    returned = trainer.predict(FakeTokenizer(), FakeSentenceData(), ckpt_path=tmp_path / "tok.ckpt")
    assert returned is None, "the writer keeps no predictions in memory (Lightning would, by default)"
    tokenizer = shards.load_manifest(tmp_path / "out").data["tokenizer"]
    assert tokenizer == {"checkpoint": str(tmp_path / "tok.ckpt"), "sha256": shards.sha256_file(tmp_path / "tok.ckpt")}


def test_interrupted_run_resumes_to_identical_shards(tmp_path):
    _tokenize(tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tokenize(tmp_path / "run", fail_at_batch=4)
    written = [p.name for p in shards.complete_shards(tmp_path / "run")]
    assert 0 < len(written) < len(shards.complete_shards(tmp_path / "ref"))
    assert not (tmp_path / "run" / "manifest.json").exists()
    _tokenize(tmp_path / "run")
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_resume_encodes_only_the_units_not_done(tmp_path):
    _tokenize(tmp_path / "ref")
    with pytest.raises(RuntimeError):
        _tokenize(tmp_path / "run", fail_at_batch=4)  # 2 batches a unit: units 0 and 1 done, unit 2 begun
    done = {i for p in shards.complete_shards(tmp_path / "run") for i in shards.read_shard_index(p).index.tolist()}
    assert done == set(range(10))
    assert not list((tmp_path / "run").glob("*.claim")), "a failing run gives its open unit back"
    encoded = _tokenize(tmp_path / "run")
    assert sorted(encoded) == sorted(set(range(23)) - done)  # nothing encoded twice
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


class WithEmptyUnit(FakeSentenceData):
    """Sentence data whose second unit holds no sentence, as an empty input shard does."""

    def work_units(self, split, sentences_per_unit):
        units = range_units(split, self.count, sentences_per_unit)
        return [units[0], WorkUnit(split, f"{split}-empty", 5, 5), *units[1:]]


def test_an_empty_unit_gets_an_empty_shard(tmp_path):
    _tokenize(tmp_path / "out", data_class=WithEmptyUnit)
    manifest = shards.load_manifest(tmp_path / "out")
    assert [s["name"] for s in manifest.shards][:3] == ["train-000000", "train-empty", "train-000001"]
    assert manifest.shards[1]["sentences"] == 0 and manifest.data["counts"]["sentences"] == 23


def test_data_without_work_units_is_refused(tmp_path):
    trainer = cpu_trainer(callbacks=[_writer(tmp_path / "out")])
    with pytest.raises(UserError, match="PlainSentenceData does not cut a split into work units"):
        trainer.predict(FakeTokenizer(), PlainSentenceData(), return_predictions=False)


def test_a_unit_claimed_by_a_live_process_is_left_to_it(tmp_path):
    _tokenize(tmp_path / "ref")
    with subprocess.Popen(["sleep", "60"]) as other:  # a live process on this host, holding unit 1
        claim = tmp_path / "run" / "train-000001.claim"
        claim.parent.mkdir()
        claim.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "time": 0}))
        encoded = _tokenize(tmp_path / "run")
        other.kill()
    assert sorted(encoded) == [i for i in range(23) if not 5 <= i < 10]
    assert not (tmp_path / "run" / "manifest.json").exists(), "the last unit is not done yet"
    with pytest.warns(UserWarning, match=f"taking over the claim of dead process {other.pid}"):
        assert sorted(_tokenize(tmp_path / "run")) == list(range(5, 10))
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_resume_refuses_a_different_setup(tmp_path):
    with pytest.raises(RuntimeError):
        _tokenize(tmp_path / "out", fail_at_batch=4)
    ckpt = tmp_path / "other.ckpt"
    ckpt.write_bytes(b"other weights")
    with pytest.raises(UserError, match="tokenizer_sha256"):
        _tokenize(tmp_path / "out", checkpoint=str(ckpt))
    with pytest.raises(UserError, match=r"train-000000.idx.npz: was written with unit=.*'stop': 5.*'stop': 4"):
        _tokenize(tmp_path / "out", sentences_per_unit=4)
    with pytest.raises(UserError, match=r"train-000001.idx.npz: not a work unit of this run .*sentences_per_unit=23"):
        _tokenize(tmp_path / "out", sentences_per_unit=23)
    with pytest.raises(UserError, match="predicts split 'val'"):
        _tokenize(tmp_path / "out2", predict_split="val")


def test_writer_rejects_bad_arguments():
    with pytest.raises(UserError, match="split='a-b'"):
        TokenWriter("out", 5, 60, split="a-b")
    with pytest.raises(UserError, match="sentences_per_unit=0"):
        TokenWriter("out", 0, 60)


def test_uint16_storage_round_trips_all_ids(tmp_path):
    layout = TokenLayout(codebook_size=K, tokens_per_image=4, num_special=4)
    imgs = [np.arange(K).reshape(4, 4)]
    shards.write_split(tmp_path, "train", layout, imgs)
    m = shards.load_manifest(tmp_path)
    assert shards.open_tokens(m.bin_path(m.shards[0]), m.dtype).tolist() == [K, *range(K), K + 1]


def test_tokenize_config_runs_through_the_cli(tmp_path, repo_root):
    import yaml

    from main import cli

    config = yaml.safe_load((repo_root / "configs" / "tokenize.yaml").read_text())
    # the stand-ins for the VQGAN and the sentence data; everything else is the shipped config
    config["model"] = {"class_path": f"{__name__}.FakeTokenizer"}
    config["data"] = {"class_path": f"{__name__}.FakeSentenceData", "init_args": {"predict_split": "train"}}
    (tmp_path / "tokenize.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "tokens"
    cli(["predict", "-c", str(tmp_path / "tokenize.yaml"), "--trainer.callbacks.init_args.output_dir", str(out)])
    manifest = shards.load_manifest(out)
    assert manifest.layout.vocab_size == K + 100 and manifest.data["counts"]["sentences"] == 23
    assert len(manifest.shards) == 1  # 4096 sentences a unit
    dm = TokenDataModule(train=str(out), seq_len=8)
    dm.setup("fit")


def test_tokenize_real_sentence_data_val_split(tmp_path):
    from datamodules import BuiltinSource, VisualSentenceDataModule

    def data():
        source = BuiltinSource(splits={"train": 3, "val": 7, "test": 0}, sequence_length=(2, 3), category_size=(2, 3))
        return VisualSentenceDataModule(source, image_size=16, unit="sentence", batch_size=3, predict_split="val")

    trainer = cpu_trainer(callbacks=[_writer(tmp_path / "val", sentences_per_unit=3, split="val")])
    trainer.predict(FakeTokenizer(), data(), return_predictions=False)
    reference, model = data(), FakeTokenizer()
    layout = TokenLayout(codebook_size=K, tokens_per_image=16, num_special=4)
    expected = []
    for i in range(7):
        images = torch.stack([to_tensor(x) for x in reference.sentence("val", i).images])  # [N, 3, H, W]
        expected.append(layout.sentence(model.encode(images)))
    m = shards.load_manifest(tmp_path / "val")
    assert m.layout == layout and m.data["split"] == "val" and m.data["counts"]["sentences"] == 7
    tokens = np.concatenate([np.asarray(shards.open_tokens(m.bin_path(s), m.dtype)) for s in m.shards])
    assert np.array_equal(tokens, torch.cat(expected).numpy())


_DDP_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {helpers!r}]
import test_tokenize as t
from lightning.pytorch import Trainer
from callbacks.token_writer import TokenWriter

# two ranks forked from this process (ddp_fork): the same DDP ranks and collectives, one import instead of two
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[TokenWriter({out!r}, 5, 60, split="train", num_special=4)])
trainer.predict(t.FakeTokenizer(fail_at_batch={fail}), t.FakeSentenceData(batch_size=2), return_predictions=False)
"""


@pytest.mark.slow
def test_ddp_ranks_pick_units_and_resume_to_the_one_process_shards(tmp_path):
    def run(out, fail=-1):
        script = tmp_path / "ddp_tokenize.py"
        script.write_text(
            _DDP_SCRIPT.format(tests=os.path.dirname(__file__), helpers=str(TESTS), out=str(out), fail=fail)
        )
        env = {**os.environ, "PL_DISABLE_FORK": "0"}  # tests/conftest.py disables fork for the in-process tests
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=env)  # fmt: skip

    _tokenize(tmp_path / "ref", batch_size=2)
    proc = run(tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "ddp") == _files(tmp_path / "ref"), "2 ranks write what 1 process writes"
    assert run(tmp_path / "run", fail=3).returncode != 0
    assert run(tmp_path / "run").returncode == 0
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_tokenize_config_composes_with_a_sentence_data_config(tmp_path, repo_root):
    import yaml

    from main import cli

    config = yaml.safe_load((repo_root / "configs" / "tokenize.yaml").read_text())
    config["model"] = {"class_path": f"{__name__}.FakeTokenizer"}  # stand-in for the VQGAN
    (tmp_path / "tokenize.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "tokens"
    args = ["-c", str(repo_root / "configs" / "data" / "builtin.yaml"), "-c", str(tmp_path / "tokenize.yaml")]
    args += ["--data.init_args.image_size", "16", "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.source.init_args.splits", "{train: 5, val: 2, test: 2}"]
    cli(["predict", *args, "--trainer.callbacks.init_args.output_dir", str(out)])
    m = shards.load_manifest(out)
    assert m.data["counts"]["sentences"] == 5 and m.data["image_size"] == 16 and m.layout.tokens_per_image == 16


def test_vqgan_tokenize_end_to_end_reproduces_encode(tmp_path, repo_root):
    """images -> `main.py predict` with the shipped configs and a VQGAN checkpoint -> shards -> windows == encode."""
    from lvm_pl.vqgan import load_tokenizer
    from main import cli

    configs = repo_root / "configs"
    base = ["-c", str(configs / "vqgan" / "tiny.yaml"), "-c", str(configs / "data" / "builtin.yaml")]
    small = ["--data.init_args.source.init_args.splits", "{train: 2, val: 3, test: 0}"]
    small += ["--data.init_args.num_workers", "0", "--data.init_args.max_images", "3"]
    built = cli([*base, *small, "--trainer.logger", "false"], run=False)
    model, data = built.model, built.datamodule  # random weights: any token map will do
    ckpt = save_checkpoint(model, tmp_path / "vqgan.ckpt")

    out = tmp_path / "tokens" / "val"
    split = ["--data.init_args.predict_split", "val", "--trainer.callbacks.init_args.split", "val"]
    args = ["predict", *base, "-c", str(configs / "tokenize.yaml"), *small, *split]
    cli([*args, "--trainer.callbacks.init_args.output_dir", str(out), "--ckpt_path", str(ckpt)])

    tokenizer = load_tokenizer(ckpt)
    manifest = shards.load_manifest(out)
    layout = manifest.layout
    assert layout == TokenLayout.for_images(tokenizer.codebook_size, 64, tokenizer.downsample_factor)
    assert manifest.data["tokenizer"]["sha256"] == shards.sha256_file(ckpt)
    with torch.no_grad():
        expected = torch.cat(
            [
                layout.sentence(tokenizer.encode(torch.stack([to_tensor(x) for x in data.sentence("val", i).images])))
                for i in range(3)
            ]
        )
    dm = TokenDataModule(val=str(out), seq_len=64, batch_size=4, eval_windows="stream")
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    labels = torch.cat([b.labels for b in batches]).flatten()
    assert torch.equal(labels[labels != -100], expected[1:])
    assert torch.equal(batches[0].input_ids[0], expected[:64])
