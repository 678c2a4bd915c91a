"""The LVM LightningModule: overfitting, vocabulary/layout links, checkpoints, on-the-fly tokenizing, the CLI fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer, lvm_shape
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from datamodules.tokens import collate_windows
from lvm_pl import shards
from lvm_pl.batches import SentenceBatch, TokenBatch
from lvm_pl.console import UserError
from lvm_pl.lvm.model import RMSNorm
from lvm_pl.lvm.module import LVM
from lvm_pl.lvm.settings import OptimSettings
from lvm_pl.stage_data import StageData
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
SMALL = dict(n_embd=32, n_layer=2, n_head=4, intermediate_size=64, block_size=64)


class RandomWindows(Dataset):
    """Fixed random token windows as `PackedWindows` gives them (one document per window)."""

    def __init__(self, n: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.windows = torch.randint(0, LAYOUT.vocab_size, (n, seq_len + 1), generator=g)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        doc_ids = torch.zeros(len(w) - 1, dtype=torch.long)
        return {"input_ids": w[:-1], "labels": w[1:], "doc_ids": doc_ids, "position": i * len(w)}


class RandomTokenData(LightningDataModule, StageData):
    """Token data declaring its layout (and, like TokenDataModule, a window length where `seq_len` is given)."""

    layout, image_size, predict_split = LAYOUT, None, None

    def __init__(self, n: int = 4, seq_len: int = 16, declare_seq_len: bool = False):
        super().__init__()
        self.data = RandomWindows(n, seq_len)
        self.seq_len = seq_len if declare_seq_len else None

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, collate_fn=collate_windows)


def small_lvm(optim: dict | None = None, **kwargs) -> LVM:
    settings = OptimSettings(**{"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.0, **(optim or {})})
    return LVM(**{"preset": "tiny", "overrides": SMALL, "optim": settings, **kwargs})


def test_loss_falls_when_overfitting_a_tiny_batch(tmp_path):
    torch.manual_seed(0)
    lvm = small_lvm()
    trainer = cpu_trainer(max_steps=60)
    data = RandomTokenData()
    batch = next(iter(data.train_dataloader()))
    trainer.fit(lvm, data)
    assert lvm.config.vocab_size == LAYOUT.vocab_size  # from the datamodule's layout
    lvm.eval()
    with torch.no_grad():
        final = lvm._loss(batch)[0].item()
    assert final < 0.5 * math.log(LAYOUT.vocab_size), final  # uniform guessing is log(V) = 3.6


def test_training_windows_shorter_than_the_context_are_warned_about():
    data = RandomTokenData(seq_len=16, declare_seq_len=True)  # the model's block_size is 64
    trainer = cpu_trainer(max_steps=1)
    with pytest.warns(UserWarning, match="data.seq_len=16 is shorter than the model's block_size=64"):
        trainer.fit(small_lvm(), data)


def test_checkpoint_layout_that_contradicts_the_shards_is_a_user_error():
    paper = TokenLayout(codebook_size=8192, tokens_per_image=256)
    trainer = cpu_trainer(max_steps=1)
    expected = (
        r"token layouts disagree: the LVM checkpoint has \{'codebook_size': 8192.*the token shards \(RandomTokenData\)"
    )
    with pytest.raises(UserError, match=expected + r" has \{'codebook_size': 32"):
        trainer.fit(small_lvm(layout=paper.to_dict()), RandomTokenData())


def test_no_layout_anywhere_is_a_user_error():
    with pytest.raises(UserError, match="no token layout"):
        small_lvm().configure_model()


def test_checkpoint_rebuilds_without_data(tmp_path):
    lvm = small_lvm()
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(lvm, RandomTokenData())
    trainer.save_checkpoint(tmp_path / "lvm.ckpt")
    loaded = LVM.load_from_checkpoint(tmp_path / "lvm.ckpt")
    assert loaded.layout == LAYOUT
    idx = torch.randint(0, LAYOUT.vocab_size, (1, 9))
    lvm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), lvm(idx))


def test_decay_excludes_norms_and_embeddings():
    lvm = small_lvm(layout=LAYOUT.to_dict(), optim={"weight_decay": 0.1, "decay_steps": 10})
    lvm.configure_model()
    lvm.trainer = Trainer(logger=False)
    groups = lvm.configure_optimizers()["optimizer"].param_groups
    decayed, plain = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(lvm.model.embed_tokens.weight) in plain and id(lvm.model.lm_head.weight) in decayed
    assert all(id(m.weight) in plain for m in lvm.model.modules() if isinstance(m, RMSNorm))
    lvm = small_lvm(
        layout=LAYOUT.to_dict(), optim={"weight_decay": 0.1, "decay_steps": 10, "exclude_from_decay": False}
    )
    lvm.configure_model()
    lvm.trainer = Trainer(logger=False)
    assert len(lvm.configure_optimizers()["optimizer"].param_groups) == 1


class FakeTokenizer(torch.nn.Module):
    """Stands in for the VQGAN: 4x4 images, downsampling 2 -> 2x2 codes from the mean colour; decode paints them."""

    codebook_size, downsample_factor = 32, 2

    def encode(self, images):  # [B, 3, 4, 4] -> [B, 2, 2]
        pooled = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2)[:, 0]
        return ((pooled + 1) / 2 * 31).round().long().clamp(0, 31)

    def decode(self, codes):  # [B, 2, 2] -> [B, 3, 4, 4]
        x = codes.float() / 31 * 2 - 1
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, None].expand(-1, 3, -1, -1)


class SentenceData(LightningDataModule, StageData):
    """Sentence data declaring its image size, as VisualSentenceDataModule does."""

    layout, image_size, seq_len, predict_split = None, 4, None, None

    def _batches(self) -> list[SentenceBatch]:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(4, 3, 3, 4, 4, generator=g) * 2 - 1
        return [SentenceBatch(images, torch.tensor([3, 2, 3, 3]), torch.arange(4), ["x"] * 4)]

    def train_dataloader(self):
        return DataLoader(self._batches(), batch_size=None)  # already batched

    def val_dataloader(self):
        return DataLoader(self._batches(), batch_size=None)


def test_on_the_fly_sentences_through_a_frozen_tokenizer(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    lvm = small_lvm(tokenizer="fake.ckpt")
    object.__setattr__(lvm, "tokenizer", FakeTokenizer())  # what lvm_pl.vqgan.load_tokenizer would return
    logger = TensorBoardLogger(tmp_path, name="otf")
    trainer = cpu_trainer(max_steps=2, logger=logger)
    trainer.fit(lvm, SentenceData())
    # the preview grid decodes through the tokenizer: 4 rows of 4x4 pixel frames, context | prediction | truth
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    image = acc.Images("val/context_prediction_truth")[-1]  # one per validation epoch
    assert (image.height, image.width) == (4 * 6 + 2, 4 * 6 + 2)
    assert lvm.layout == TokenLayout(codebook_size=32, tokens_per_image=4)
    assert lvm.config.vocab_size == 132
    batch = lvm.token_batch(SentenceData()._batches()[0])
    assert batch.input_ids.shape == (4, 13)  # [BOS] + 3 images x 4 codes + [EOS], minus the last
    assert batch.input_ids[:, 0].eq(32).all()
    assert batch.labels[1, 8].item() == 33 and (batch.labels[1, 9:] == -100).all()  # 2-image sentence: EOS
    assert [(s.row, s.start, s.num_images, s.kind, s.index) for s in batch.sentences] == [
        (0, 0, 3, "x", 0),
        (1, 0, 2, "x", 1),
        (2, 0, 3, "x", 2),
        (3, 0, 3, "x", 3),
    ]
    assert not any(k.startswith("tokenizer") for k in lvm.state_dict())


def _tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Tags()


def test_fit_tiny_config_on_token_shards_writes_scalars_and_images(tmp_path, repo_root):
    from main import cli

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 6)):
        sentences = [rng.integers(0, LAYOUT.codebook_size, size=(3, LAYOUT.tokens_per_image)) for _ in range(n)]
        shards.write_split(tmp_path / "tokens" / split, split, LAYOUT, sentences)
    cli(
        [
            "fit",
            "-c",
            str(repo_root / "configs/lvm/tiny.yaml"),
            f"--data.train={tmp_path / 'tokens/train'}",
            f"--data.val={tmp_path / 'tokens/val'}",
            "--data.seq_len=28",
            lvm_shape(n_layer=2, n_head=4),
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (run,) = (tmp_path / "runs" / "lvm_tiny").glob("version_*")
    tags = _tensorboard_tags(run)
    scalars = set(tags["scalars"])
    expected = {"train/loss", "train/perplexity", "train/lr", "train/grad_norm", "val/loss", "val/perplexity"}
    assert expected <= scalars, scalars
    # ThroughputMonitor: items are tokens (length_fn), FLOPs from measure_flops; MFU needs a GPU's peak rate
    assert {"train/device/items_per_sec", "train/device/flops_per_sec"} <= scalars, scalars
    assert tags["images"] == ["val/context_prediction_truth"]
    # the CLI's checkpoint carries the resolved layout: it loads back without data
    loaded = LVM.load_from_checkpoint(tmp_path / "runs" / "lvm_tiny" / "checkpoints" / "last.ckpt")
    assert loaded.layout == LAYOUT and loaded.config.vocab_size == LAYOUT.vocab_size


@pytest.mark.slow
def test_compiled_blocks_keep_names_and_logits():
    eager = small_lvm(layout=LAYOUT.to_dict())
    eager.configure_model()
    compiled = small_lvm(layout=LAYOUT.to_dict(), compile=True)
    compiled.configure_model()
    compiled.model.load_state_dict(eager.model.state_dict())  # same names: checkpoints move between the two
    idx = torch.randint(0, LAYOUT.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), eager(idx), atol=1e-5, rtol=1e-5)


def test_on_the_fly_sentence_longer_than_the_context_keeps_its_latest_whole_frames():
    # block_size 10 holds [BOS] + 2 images of 4 codes + [EOS] - 1 = 9 inputs, not 3 images (13)
    layout = TokenLayout(codebook_size=32, tokens_per_image=4).to_dict()
    lvm = small_lvm(tokenizer="fake.ckpt", layout=layout, overrides={**SMALL, "block_size": 10})
    object.__setattr__(lvm, "tokenizer", FakeTokenizer())
    lvm.configure_model()
    batch = SentenceData()._batches()[0]
    rows = lvm.token_batch(batch)
    assert rows.input_ids.shape == (4, 9)
    codes = FakeTokenizer().encode(batch.images[0, 1:]).flatten(1)  # images 1 and 2 of the 3-image sentence
    assert rows.input_ids[0].tolist() == [32, *codes.flatten().tolist()]
    assert rows.labels[0, -1].item() == 33  # EOS still closes it
    assert rows.sentences[0].num_images == 2  # the sentence as kept, so evaluation reads the frames it holds
    lvm(rows.input_ids)  # fits the context


def test_images_of_another_size_than_the_layout_are_a_user_error():
    layout = TokenLayout(codebook_size=32, tokens_per_image=4).to_dict()
    lvm = small_lvm(tokenizer="fake.ckpt", layout=layout)
    object.__setattr__(lvm, "tokenizer", FakeTokenizer())
    lvm.configure_model()
    batch = SentenceData()._batches()[0]
    batch.images = torch.nn.functional.interpolate(batch.images.flatten(0, 1), size=8).unflatten(0, (4, 3))
    with pytest.raises(UserError, match="data.image_size=8: the tokenizer makes 16 tokens"):
        lvm.token_batch(batch)


def test_changed_token_weight_weighs_the_tokens_that_differ_from_the_image_before():
    # two sentences [BOS, image 1, image 2, EOS], [BOS, image]: image 2 changes tokens 2 and 4 of image 1
    stream = torch.tensor([[32, 1, 2, 3, 4, 1, 5, 3, 6, 33, 32, 7, 8, 9, 10, 33]])
    batch = TokenBatch(stream[:, :-1], stream[:, 1:], torch.tensor([[0] * 10 + [1] * 5]))
    lvm = small_lvm(layout=LAYOUT.to_dict(), changed_token_weight=4.0)
    lvm.configure_model()
    changed = lvm._changed_tokens(batch)[0]
    assert torch.nonzero(changed).flatten().tolist() == [5, 7]  # labels 5 and 6; the next sentence's first image: none
    loss, plain = lvm._training_loss(batch)
    logits = lvm.model(batch.input_ids, doc_ids=batch.doc_ids)[0]
    nll = F.cross_entropy(logits, batch.labels[0], reduction="none")
    weights = 1 + 3 * changed.float()
    torch.testing.assert_close(loss, (nll * weights).sum() / weights.sum())
    torch.testing.assert_close(plain, nll.mean())  # what train/loss logs
    with pytest.raises(UserError, match="changed_token_weight: 0"):
        small_lvm(changed_token_weight=0)


def test_a_context_that_holds_no_whole_image_is_one_line_naming_the_fix():
    layout = TokenLayout(codebook_size=32, tokens_per_image=64, num_special=4).to_dict()
    lvm = small_lvm(layout=layout, overrides={**SMALL, "block_size": 32})
    with pytest.raises(UserError, match="block_size=32 holds no whole image of 64 tokens; .* at least 64$"):
        lvm.configure_model()
