import pickle
import re

import numpy as np
import pytest
import torch
from helpers import TESTS, cpu_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules.order import OrderSampler
from datamodules.tokens import TokenDataModule, sentence_windows, stream_windows
from lvm_pl import shards
from lvm_pl.batches import TokenBatch
from lvm_pl.console import UserError
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)


def _write(path, counts, seed=0, shard_tokens=16, kinds=None):
    """Shards of sentences with `counts` images each; returns the expected token stream."""
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, LAYOUT.codebook_size, size=(n, LAYOUT.tokens_per_image)) for n in counts]
    shards.write_split(path, "train", LAYOUT, imgs, kinds, shard_tokens=shard_tokens)
    return np.concatenate([LAYOUT.sentence(torch.as_tensor(i)).numpy() for i in imgs])


def _batches(loader):
    return [b for b in loader]


@pytest.mark.parametrize("tail", ["pad", "drop"])
def test_stream_packing_wastes_no_token(tmp_path, tail):
    stream = _write(tmp_path, [1, 3, 2, 1, 4, 2])  # 6 + 14 + 10 + 6 + 18 + 10 = 64 tokens over 4 shards
    dm = TokenDataModule(train=str(tmp_path), seq_len=10, batch_size=3, shuffle=False, tail=tail)
    dm.setup("fit")
    batches = _batches(dm.train_dataloader())
    assert all(isinstance(b, TokenBatch) for b in batches)
    ids = torch.cat([b.input_ids for b in batches])
    labels = torch.cat([b.labels for b in batches])
    # each row's place in the stream: where evaluation looks its sentences up
    assert torch.cat([b.positions for b in batches]).tolist() == [10 * w for w in range(len(ids))]
    assert ids.shape[1] == labels.shape[1] == 10
    got = labels[labels != -100].numpy()
    if tail == "pad":  # 63 labels: 6 full windows + one of 3 labels, padded
        assert np.array_equal(got, stream[1:])
        assert (labels == -100).sum() == 7 and ids.shape[0] == 7
    else:  # the 3-label tail is dropped, nothing else
        assert np.array_equal(got, stream[1:61])
        assert (labels == -100).sum() == 0 and ids.shape[0] == 6
    for w in range(6):  # input_ids are the window's first T tokens, labels the same shifted by one
        assert np.array_equal(ids[w].numpy(), stream[w * 10 : w * 10 + 10])


def test_doc_ids_number_sentences_inside_each_window(tmp_path):
    counts = [1, 3, 2, 1, 4, 2]
    kinds = ["single", "sequence", "analogy", "single", "category", "sequence"]
    stream = _write(tmp_path, counts, kinds=kinds)
    starts = np.cumsum([0] + [LAYOUT.sentence_length(n) for n in counts])[:-1]
    dm = TokenDataModule(train=str(tmp_path), seq_len=10, batch_size=1, shuffle=False)
    dm.setup("fit")
    for w, batch in enumerate(_batches(dm.train_dataloader())):
        positions = np.arange(w * 10, w * 10 + 10)
        sentence_of = np.searchsorted(starts, positions, side="right") - 1
        expected = sentence_of - sentence_of[0]
        n = int((batch.labels[0] != -100).sum())
        assert batch.doc_ids[0, :n].tolist() == expected[:n].tolist()
        assert (batch.doc_ids[0, n:] == -1).all()
        # a new doc id starts exactly where a BOS sits in the input
        bos = (batch.input_ids[0, 1:n] == LAYOUT.bos_id).numpy()
        assert np.array_equal(np.diff(batch.doc_ids[0, :n].numpy()) == 1, bos)
    assert stream[0] == LAYOUT.bos_id
    index = dm.sentence_index("train")  # the shard indexes, as evaluation reads them
    assert index.starts.tolist() == starts.tolist() and index.num_tokens == len(stream)
    assert index.kinds == kinds and dm.sentence_index("test") is None


def test_sentence_windows_start_at_boundaries_and_cover_every_sentence(tmp_path):
    counts = [1, 3, 2, 1, 4, 2]
    stream = _write(tmp_path, counts)
    lengths = [LAYOUT.sentence_length(n) for n in counts]
    starts = np.cumsum([0, *lengths])[:-1]
    w_starts, w_lengths = sentence_windows(starts, len(stream), seq_len=13)
    # 6 | 14 (longer than 14: split 14 + 1 continuation... ) -> check the invariants, not one packing
    covered = np.zeros(len(stream), dtype=bool)
    for s, n in zip(w_starts, w_lengths, strict=True):
        assert n <= 14
        assert s in starts or covered[s], "a window starts at a sentence or continues the previous one"
        covered[s : s + n] = True
    assert covered.all()
    dm = TokenDataModule(train=str(tmp_path), val=str(tmp_path), seq_len=13, batch_size=2)
    dm.setup("fit")
    val = _batches(dm.val_dataloader())
    firsts = torch.cat([b.input_ids[:, 0] for b in val])
    assert len(firsts) == len(w_starts)
    assert (firsts == torch.as_tensor(stream[w_starts])).all()


def test_stream_windows_edge_cases():
    assert stream_windows(1, 4, "pad")[0].size == 0  # a single token has no label
    s, n = stream_windows(9, 4, "pad")
    assert s.tolist() == [0, 4] and n.tolist() == [5, 5]


def test_sampler_is_deterministic_and_splits_ranks():
    a = list(OrderSampler(11, 1, 0, shuffle=True, seed=3))
    assert a == list(OrderSampler(11, 1, 0, shuffle=True, seed=3))
    s = OrderSampler(11, 1, 0, shuffle=True, seed=3)
    s.set_epoch(1)
    assert list(s) != a and sorted(s) == list(range(11))
    ranks = [list(OrderSampler(11, 2, r, shuffle=True, seed=3)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert set(ranks[0]) | set(ranks[1]) == set(range(11))
    assert len(set(ranks[0]) & set(ranks[1])) == 1  # 11 windows on 2 ranks: one is repeated to even them out
    evals = [list(OrderSampler(11, 2, r, shuffle=False, seed=3, even=False)) for r in range(2)]
    assert sorted(evals[0] + evals[1]) == list(range(11))  # evaluation sees each window exactly once
    assert [len(OrderSampler(11, 2, r, shuffle=False, seed=3, even=False)) for r in range(2)] == [6, 5]


def test_setup_errors_name_the_file(tmp_path):
    _write(tmp_path, [2, 2, 2])
    dm = TokenDataModule(train=str(tmp_path), seq_len=8)
    from lvm_pl.lvm.module import LVM

    paper = TokenLayout(codebook_size=8192, tokens_per_image=256)
    manifest = re.escape(dm.describe())
    assert dm.describe().startswith(str(tmp_path))
    # the layout handshake names the shards' manifest when a model's layout contradicts it
    with pytest.raises(UserError, match=rf"token layouts disagree: .* the token shards \({manifest}\) has "):
        cpu_trainer(max_steps=1).fit(LVM(layout=paper.to_dict()), TokenDataModule(train=str(tmp_path), seq_len=8))
    m = shards.load_manifest(tmp_path)
    path = m.bin_path(m.shards[-1])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match=rf"{path}: truncated"):
        dm.setup("fit")
    with pytest.raises(UserError, match="matches no shard directory"):
        TokenDataModule(train=str(tmp_path / "nope-*"))


def test_setup_rejects_out_of_range_ids_and_mixed_layouts(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, LAYOUT.codebook_size, size=(1, 4))]
    imgs[0][0, 0] = LAYOUT.vocab_size
    shards.write_split(tmp_path / "bad", "train", LAYOUT, imgs)
    with pytest.raises(UserError, match=f"token id {LAYOUT.vocab_size} is out of range"):
        TokenDataModule(train=str(tmp_path / "bad"), seq_len=4).setup("fit")
    other = TokenLayout(codebook_size=64, tokens_per_image=4)
    shards.write_split(tmp_path / "other", "val", other, [np.zeros((1, 4), dtype=np.int64)])
    with pytest.raises(UserError, match="differs from"):
        TokenDataModule(train=str(tmp_path / "bad"), val=str(tmp_path / "other"))


def test_stream_pickles_without_token_data(tmp_path):
    _write(tmp_path, [100] * 50, shard_tokens=5000)
    dm = TokenDataModule(train=str(tmp_path), seq_len=256)
    dm.setup("fit")
    ds = dm.datasets["train"]
    ds[0]  # opens the memmaps
    blob = pickle.dumps(ds)
    assert len(blob) < ds.stream.num_tokens  # memmaps are reopened in workers, not copied
    assert torch.equal(pickle.loads(blob)[3]["input_ids"], ds[3]["input_ids"])  # dataset items stay dicts


class _Recorder(LightningModule):
    """Trains nothing; records every window it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += batch.input_ids.tolist()
        return (self.w**2).sum() + 1.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(data_dir, max_steps=-1, ckpt_dir=None, ckpt_path=None, every=None):
    model = _Recorder()
    dm = TokenDataModule(train=str(data_dir), seq_len=6, batch_size=2, seed=7)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1)] if ckpt_dir else []
    trainer = cpu_trainer(
        max_epochs=2,
        max_steps=max_steps,
        enable_checkpointing=bool(ckpt_dir),
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("stop_at", [2, 5, 7])  # mid epoch 0, end of epoch 0, mid epoch 1 (5 batches per epoch)
def test_mid_epoch_resume_sees_exactly_the_remaining_windows(tmp_path, stop_at):
    _write(tmp_path / "data", [2] * 6)  # 6 x 10 tokens -> 59 labels -> 10 windows of 6
    reference = _fit(tmp_path / "data")
    assert len(reference) == 20 and reference[:10] != reference[10:20]  # shuffled differently per epoch
    first = _fit(tmp_path / "data", max_steps=stop_at, ckpt_dir=tmp_path / "ckpt", every=stop_at)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    rest = _fit(tmp_path / "data", ckpt_path=str(ckpt))
    assert first + rest == reference


def test_resume_with_a_different_window_order_warns_and_restarts_the_epoch(tmp_path):
    _write(tmp_path, [2] * 6)
    dm = TokenDataModule(train=str(tmp_path), seq_len=6, batch_size=2, seed=7)
    dm.setup("fit")
    dm.load_state_dict({"epoch": 1, "consumed": 4, "num_items": 10, "world_size": 4, "seed": 7})
    with pytest.warns(UserWarning, match="epoch restarts from its first item"):
        sampler = dm.train_dataloader().sampler
    assert sampler.epoch == 1 and len(list(sampler)) == 10


@pytest.mark.parametrize("key", ["num_items", "num_windows"])  # checkpoints before the shared order: num_windows
def test_resume_state_of_either_key_continues_mid_epoch(tmp_path, key, recwarn):
    _write(tmp_path, [2] * 6)
    dm = TokenDataModule(train=str(tmp_path), seq_len=6, batch_size=2, seed=7)
    dm.setup("fit")
    dm.load_state_dict({"epoch": 1, "consumed": 4, key: 10, "world_size": 1, "seed": 7})
    sampler = dm.train_dataloader().sampler
    epoch = OrderSampler(10, 1, 0, shuffle=True, seed=7)
    epoch.set_epoch(1)
    assert sampler.epoch == 1 and list(sampler) == list(epoch)[4:]
    assert not [w for w in recwarn if "training order" in str(w.message)]


def test_data_config_builds_the_module(tmp_path, repo_root):
    from main import cli

    _write(tmp_path / "train", [2] * 4)
    _write(tmp_path / "val", [1] * 3)
    c = cli(
        [
            "-c",
            str(repo_root / "configs" / "data" / "tokens.yaml"),
            "--model",
            "lightning.pytorch.demos.boring_classes.BoringModel",
            "--data.init_args.train",
            str(tmp_path / "train"),
            "--data.init_args.val",
            str(tmp_path / "v*"),
        ],
        run=False,
    )
    dm = c.datamodule
    assert isinstance(dm, TokenDataModule) and dm.seq_len is None and dm.layout == LAYOUT
    assert dm.splits["val"] == [tmp_path / "val"]


def test_worker_processes_serve_the_same_batches(tmp_path):
    _write(tmp_path, [3] * 8)
    batches = {}
    for workers in (0, 1):
        dm = TokenDataModule(train=str(tmp_path), seq_len=8, batch_size=3, num_workers=workers, seed=1)
        dm.setup("fit")
        batches[workers] = _batches(dm.train_dataloader())
    assert len(batches[0]) == len(batches[1]) > 1
    for a, b in zip(batches[0], batches[1], strict=True):
        assert a.sentences is b.sentences is None  # token shards: evaluation finds sentences from the positions
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "labels", "doc_ids", "positions"))


_DDP_FIT = """
import json, sys
sys.path[:0] = [{tests!r}, {helpers!r}]
import test_token_data as t
from lightning.pytorch import Trainer
from datamodules.order import OrderSampler
from datamodules.tokens import TokenDataModule

model = t._Recorder()
dm = TokenDataModule(train={data!r}, seq_len=6, batch_size=2, seed=7)
trainer = Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, dm)
assert type(trainer.train_dataloader.sampler) is OrderSampler, type(trainer.train_dataloader.sampler)
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(model.seen, f)
"""


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_windows(tmp_path):
    import json
    import os
    import subprocess
    import sys

    stream = _write(tmp_path / "data", [2] * 6)  # 10 windows: 5 per rank, 3 batches of 2 (the last one short)
    script = tmp_path / "ddp_fit.py"
    tests = os.path.dirname(__file__)
    script.write_text(_DDP_FIT.format(tests=tests, helpers=str(TESTS), data=str(tmp_path / "data"), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 5
    windows = sorted(tuple(stream[i * 6 : i * 6 + 6].tolist()) for i in range(10))
    assert sorted(map(tuple, seen[0] + seen[1])) == windows  # each window once, on exactly one rank


class _SeenWindows(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch.input_ids.tolist()


def _fit_lvm(data_dir, max_steps=-1, ckpt_dir=None, ckpt_path=None):
    from lvm_pl.lvm.module import LVM

    model = LVM(preset="tiny", overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "intermediate_size": 64})
    seen = _SeenWindows()
    callbacks = [seen]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = cpu_trainer(
        max_epochs=2, max_steps=max_steps, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks, limit_val_batches=0
    )
    trainer.fit(model, TokenDataModule(train=str(data_dir), seq_len=6, batch_size=2, seed=7), ckpt_path=ckpt_path)
    return seen.seen


def test_lvm_resume_mid_epoch_continues_with_the_right_window(tmp_path):
    """With the real LVM module, whose LR schedule asks for `estimated_stepping_batches` before the restore."""
    _write(tmp_path / "data", [2] * 6)
    reference = _fit_lvm(tmp_path / "data")
    first = _fit_lvm(tmp_path / "data", max_steps=7, ckpt_dir=tmp_path / "ckpt")
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    rest = _fit_lvm(tmp_path / "data", ckpt_path=str(ckpt))
    assert len(reference) == 20 and first + rest == reference
