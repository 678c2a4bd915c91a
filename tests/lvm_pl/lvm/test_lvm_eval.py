"""LVM evaluation: target perplexity by hand, uniform models, the context-length frames, next-frame quality, files."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lvm_pl import metrics as image_metrics
from lvm_pl.batches import Sentence, SentenceBatch, TokenBatch
from lvm_pl.lvm import evaluation as ev
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.evaluation import metrics as em
from lvm_pl.lvm.evaluation import report
from lvm_pl.lvm.model import LLaMA
from lvm_pl.lvm.module import LVM
from lvm_pl.lvm.settings import EvalSettings
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
SMALL = dict(n_embd=32, n_layer=2, n_head=4, intermediate_size=64, block_size=128)


def tiny_llama(seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(LVMConfig.from_name("tiny", **SMALL, vocab_size=LAYOUT.vocab_size, init_std=0.5)).eval()
    return model


def rows_of(sentences: list[torch.Tensor], kinds: list[str] | None = None) -> TokenBatch:
    """[BOS] img.. [EOS] sentences -> right-padded rows as `LVM.token_batch` builds them (its sentences listed when
    `kinds` are given, as the maker of a token batch from a sentence batch lists them)."""
    length = max(len(s) for s in sentences) - 1
    input_ids = torch.full((len(sentences), length), LAYOUT.eos_id)
    labels = torch.full_like(input_ids, -100)
    for b, s in enumerate(sentences):
        input_ids[b, : len(s) - 1], labels[b, : len(s) - 1] = s[:-1], s[1:]
    listed = None
    if kinds is not None:
        listed = [
            Sentence(b, 0, LAYOUT.num_images(len(s)), k, b)
            for b, (s, k) in enumerate(zip(sentences, kinds, strict=True))
        ]
    return TokenBatch(input_ids, labels, torch.zeros_like(input_ids), sentences=listed)


class Uniform(torch.nn.Module):
    """Logits all zero: every id equally likely."""

    def forward(self, idx, **kwargs):
        return torch.zeros(*idx.shape, LAYOUT.vocab_size)


def test_target_perplexity_is_the_mean_over_examples_of_exp_mean_nll():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 32, (n, 4), generator=g) for n in (3, 1, 2)]
    batch = rows_of([LAYOUT.sentence(x) for x in images])
    model = tiny_llama()
    with torch.no_grad():
        logits = model(batch.input_ids)
    spans = em.batch_sentences(batch, LAYOUT)
    assert spans == [Sentence(0, 0, 3), Sentence(1, 0, 1), Sentence(2, 0, 2)]
    nll = em.target_nll(logits, batch.labels, spans, LAYOUT)
    records = [{"kind": "x", "index": i, "nll": a, "nll_plain": b} for i, (a, b) in enumerate(nll.tolist())]
    summary = em.summarize_targets(records)["all"]

    by_hand, by_hand_plain = [], []
    for b, x in enumerate(images):
        restricted, plain = [], []
        for t in range(4):  # target token t of the last image sits at 1 + (n-1)*4 + t; its logit one before
            row = logits[b, (len(x) - 1) * 4 + t].double().tolist()
            target = int(x[-1, t])
            plain.append(math.log(sum(math.exp(v) for v in row)) - row[target])
            restricted.append(math.log(sum(math.exp(v) for v in row[:32])) - row[target])
        by_hand.append(math.exp(sum(restricted) / 4))
        by_hand_plain.append(math.exp(sum(plain) / 4))
    assert summary["examples"] == 3
    assert summary["perplexity"] == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    assert summary["perplexity_plain"] == pytest.approx(sum(by_hand_plain) / 3, rel=1e-5)
    assert summary["perplexity_plain"] > summary["perplexity"]  # special ids only take probability away


def test_uniform_logits_give_codebook_size_and_vocabulary_size():
    images = [torch.randint(0, 32, (n, 4)) for n in (2, 4)]
    batch = rows_of([LAYOUT.sentence(x) for x in images], kinds=["analogy", "sequence"])
    evaluation = ev.TestEvaluation(LAYOUT, max_context=0, next_frame_examples=0)
    sentences = SentenceBatch(
        torch.zeros(2, 4, 3, 4, 4), torch.tensor([2, 4]), torch.arange(2), ["analogy", "sequence"]
    )
    evaluation.update(Uniform(), sentences, batch, Uniform()(batch.input_ids))
    summary = em.summarize_targets(evaluation.targets)
    assert list(summary) == ["sequence", "analogy", "all"]
    for group in summary.values():
        assert group["perplexity"] == pytest.approx(LAYOUT.codebook_size)
        assert group["perplexity_plain"] == pytest.approx(LAYOUT.vocab_size)
    study = em.context_length_nll(Uniform(), images[1], 3, LAYOUT)
    torch.testing.assert_close(study.exp(), torch.tensor([[32.0, 36.0]] * 3))


def test_sentences_cut_by_the_window_end_are_left_out_and_packed_ones_found():
    a, b = LAYOUT.sentence(torch.randint(0, 32, (2, 4))), LAYOUT.sentence(torch.randint(0, 32, (3, 4)))
    stream = torch.cat([a, b])  # 10 + 14 tokens; a window of 17 holds a and the start of b
    window = TokenBatch(stream[None, :17], stream[None, 1:18], torch.zeros(1, 17, dtype=torch.long))
    assert LAYOUT.find_sentences(window.row_tokens(0)) == [(0, 2)]
    assert em.batch_sentences(window, LAYOUT) == [Sentence(0, 0, 2)]
    whole = TokenBatch(stream[None, :-1], stream[None, 1:], torch.zeros(1, 23, dtype=torch.long))
    assert LAYOUT.find_sentences(whole.row_tokens(0)) == [(0, 2), (10, 3)]
    assert em.batch_sentences(whole, LAYOUT) == [Sentence(0, 0, 2), Sentence(0, 10, 3)]
    torch.testing.assert_close(em.sentence_frames(whole, Sentence(0, 10, 3), LAYOUT), LAYOUT.images(b))


class Recorder(torch.nn.Module):
    """Copies its input: the logit of the id at position p is 10 (others 0); keeps every row it was given."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, idx):
        self.rows.append(idx[0].clone())
        return 10.0 * torch.nn.functional.one_hot(idx, LAYOUT.vocab_size).float()


def test_context_study_evaluates_exactly_the_frames_asked():
    assert em.context_frames(5, 4) == [([3], 4), ([2, 3], 4), ([1, 2, 3], 4), ([0, 1, 2, 3], 4)]
    assert em.context_frames(4, 4) == []  # needs K + 1 frames
    frames = torch.arange(7)[:, None].expand(7, 4) + 10  # frame f is four copies of id 10 + f
    model = Recorder()
    study = em.context_length_nll(model, frames, 4, LAYOUT)
    assert len(model.rows) == 4
    for k, row in enumerate(model.rows, start=1):
        # [BOS], frames 4-k .. 3, then frame 4 without its last token (nothing is predicted from it)
        expected = [LAYOUT.bos_id] + [10 + f for f in range(4 - k, 5) for _ in range(4)]
        assert row.tolist() == expected[:-1]
    # the copy model is right on target tokens 2..4 (their predecessor is the target frame) and wrong on the first
    right = -math.log(math.exp(10) / (math.exp(10) + 31))
    wrong = -math.log(1 / (math.exp(10) + 31))
    torch.testing.assert_close(study[:, 0], torch.full((4,), (wrong + 3 * right) / 4))


def test_next_frame_prediction_is_the_greedy_generation_decoded():
    from lvm_pl.lvm.generation import GenerationSettings, generate_no_cache

    layout = TokenLayout(codebook_size=32, tokens_per_image=4)
    torch.manual_seed(3)
    model = LLaMA(LVMConfig.from_name("tiny", **SMALL, vocab_size=layout.vocab_size, init_std=0.5)).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    tokenizer = FakeTokenizer()
    quality = em.next_frame_quality(model, tokenizer, images, layout)
    codes = tokenizer.encode(images).flatten(1)  # [3, 4]
    greedy = generate_no_cache(model, codes[None, :2], 1, layout, GenerationSettings(temperature=0.0))
    predicted = tokenizer.decode(greedy.view(1, 2, 2))
    psnr, ssim = image_metrics.psnr(predicted, images[-1:]), image_metrics.ssim(predicted, images[-1:])
    assert quality["predicted_psnr"] == pytest.approx(float(psnr[0])) and quality["predicted_ssim"] == pytest.approx(
        float(ssim[0])
    )
    psnr = image_metrics.psnr(images[1:2], images[2:])
    assert quality["copy_last_psnr"] == pytest.approx(float(psnr[0]))
    assert quality["predicted_token_accuracy"] == pytest.approx(float((greedy[0, 0] == codes[2]).float().mean()))
    assert quality["copy_last_token_accuracy"] == pytest.approx(float((codes[1] == codes[2]).float().mean()))


def square_at(x: int, y: int, size: int = 32, side: int = 6, fg: float = 0.8, bg: float = -0.6) -> torch.Tensor:
    """A [3, size, size] frame in [-1, 1]: a `side`-pixel square with top-left corner (x, y) on a plain background."""
    image = torch.full((3, size, size), bg)
    image[:, y : y + side, x : x + side] = fg
    return image


def test_object_metrics_reward_the_moved_object_and_refuse_the_blur_that_psnr_prefers():
    previous, truth = square_at(6, 10), square_at(12, 10)  # moved 6 px right
    blur = (square_at(6, 10) + square_at(12, 10) + square_at(18, 10)) / 3  # hedging between three positions
    assert em.object_match(truth, truth) == {"position_error": 0.0, "present": 1.0}
    assert em.object_match(square_at(13, 10), truth) == {"position_error": pytest.approx(1.0), "present": 1.0}
    assert em.object_match(previous, truth)["position_error"] == pytest.approx(6.0)
    # PSNR ranks the blur above copying the last frame; presence says it drew no object of the right size
    psnr = lambda a: float(image_metrics.psnr(a[None], truth[None])[0])  # noqa: E731
    assert psnr(blur) > psnr(previous)
    assert em.object_match(blur, truth) == {"position_error": None, "present": 0.0}
    assert em.object_match(torch.full_like(truth, -0.6), truth)["present"] == 0.0  # the object vanished
    assert em.object_match(truth, torch.full_like(truth, -0.6)) == {}  # no object in the truth: not measured


def test_next_frame_summary_groups_by_family_and_skips_absent_objects():
    records = [
        {"kind": "sequence", "index": 0, "family": "moving", "predicted_position_error": 2.0, "predicted_present": 1.0},
        {
            "kind": "sequence",
            "index": 1,
            "family": "moving",
            "predicted_position_error": None,
            "predicted_present": 0.0,
        },
        {"kind": "analogy", "index": 2, "family": "invert", "predicted_token_accuracy": 0.5},
    ]
    out = em.summarize_next_frame(records)
    assert out["family/moving"] == {"examples": 2, "predicted_position_error": 2.0, "predicted_present": 0.5}
    assert out["family/invert"]["predicted_token_accuracy"] == 0.5 and out["all"]["examples"] == 3
    assert report.scalars({"target_perplexity": {}, "next_frame": out})["test/next_frame/predicted_present/sequence"]


def test_context_table_files(tmp_path):
    rows = em.summarize_context(
        [
            {"index": 0, "nll": [3.0, 2.0], "nll_plain": [3.5, 2.5]},
            {"index": 1, "nll": [1.0, 0.0], "nll_plain": [1, 0]},
        ],
        2,
    )
    assert rows[1]["perplexity"] == pytest.approx((math.exp(2) + 1) / 2)
    paths = report.write_context_table(tmp_path, rows, "frames described")
    assert [p.name for p in paths] == ["context_length.csv", "context_length.json", "context_length.png"]
    lines = paths[0].read_text().splitlines()
    assert lines[0] == "context_frames,examples,perplexity,perplexity_plain,nll,nll_plain"
    assert lines[2].startswith("2,2,")
    assert json.loads(paths[1].read_text())["rows"] == rows
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_plot_draws_the_copy_last_baseline_beside_the_curve(tmp_path):
    rows = em.summarize_context([{"index": 0, "nll": [3.0, 2.0], "nll_plain": [3.5, 2.5]}], 2)
    next_frame = {
        "sequence": {"examples": 3, "predicted_psnr": 19.0, "copy_last_psnr": 17.5},
        "family/moving": {"examples": 3, "predicted_psnr": 19.0, "copy_last_psnr": 17.5},  # families: not drawn
    }
    alone = np.asarray(Image.open(io.BytesIO(report.context_plot(rows))).convert("L"))
    both = np.asarray(Image.open(io.BytesIO(report.context_plot(rows, next_frame))).convert("L"))
    assert both.shape[0] == alone.shape[0] and both.shape[1] > 1.8 * alone.shape[1]  # a second panel
    right = both[:, both.shape[1] // 2 + 20 :]
    assert (right < 128).mean() > 0.01  # axes, bars and their labels drawn there
    assert (alone[:, : alone.shape[1] // 10] < 128).any()  # the y-axis label left of the curve


class FakeTokenizer(torch.nn.Module):
    """Stands in for the VQGAN on 16x16 images: 8x8 patch means -> 2x2 codes of 32 gray levels; decode paints them."""

    codebook_size, downsample_factor = 32, 8

    def encode(self, images):  # [B, 3, 16, 16] -> [B, 2, 2]
        pooled = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)[:, 0]
        return ((pooled + 1) / 2 * 31).round().long().clamp(0, 31)

    def decode(self, codes):  # [B, 2, 2] -> [B, 3, 16, 16]
        x = codes.float() / 31 * 2 - 1
        return x.repeat_interleave(8, -1).repeat_interleave(8, -2)[:, None].expand(-1, 3, -1, -1)


def builtin_sentences(test: int):
    from datamodules import BuiltinSource, VisualSentenceDataModule

    source = BuiltinSource(
        weights={"moving": 2.0, "invert": 1.0, "shapes": 1.0},
        splits={"train": 0, "val": 0, "test": test},
        sequence_length=(4, 6),
        analogy_pairs=(1, 2),
        category_size=(2, 3),
    )
    return VisualSentenceDataModule(source, image_size=16, unit="sentence", batch_size=4)


def test_on_the_fly_test_run_with_next_frame_quality(tmp_path):
    layout = TokenLayout(codebook_size=32, tokens_per_image=4)
    lvm = LVM(
        preset="tiny",
        overrides=SMALL,
        tokenizer="fake.ckpt",
        evaluation=EvalSettings(context_frames=3, next_frame_examples=3),
    )
    object.__setattr__(lvm, "tokenizer", FakeTokenizer())  # what lvm_pl.vqgan.load_tokenizer would return
    data = builtin_sentences(test=10)
    logger = TensorBoardLogger(tmp_path, name="eval")
    trainer = Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(lvm, data)
    results = json.loads((tmp_path / "eval/version_0" / report.RESULTS_FILE).read_text())

    kinds = [s.kind for s in data.sentences("test")]
    targets = results["target_perplexity"]
    assert {k: v["examples"] for k, v in targets.items()} == {
        **{k: kinds.count(k) for k in set(kinds)},
        "all": len(kinds),
    }
    for group in targets.values():  # an untrained model: close to knowing nothing
        assert 0.5 * layout.codebook_size < group["perplexity"] < 2 * layout.codebook_size
    assert metrics["test/target_perplexity"] == pytest.approx(targets["all"]["perplexity"], rel=1e-5)
    long_sequences = sum(1 for s in data.sentences("test") if s.kind == "sequence" and len(s.images) >= 4)
    assert long_sequences > 0 and results["context_length"]["rows"][0]["examples"] == long_sequences
    assert (tmp_path / "eval/version_0/context_length.png").is_file()

    quality = results["next_frame"]["all"]
    assert quality["examples"] == 3
    # the copy baseline by hand, over the first three sequences/analogies in test order
    picked = [s for s in data.sentences("test") if s.kind in ("sequence", "analogy")][:3]
    from lvm_pl.images import to_tensor

    psnr = []
    for s in picked:
        last, truth = to_tensor(s.images[-2]), to_tensor(s.images[-1])
        psnr.append(10 * math.log10(4 / float((last - truth).pow(2).mean())))
    assert quality["copy_last_psnr"] == pytest.approx(float(np.mean(psnr)), rel=1e-4)
    families = {f"family/{s.meta['family']}" for s in picked}  # the sentences' families reach the summary
    assert families <= set(results["next_frame"]) and "copy_last_token_accuracy" in quality
    assert 0 < quality["reconstruction_ssim"] <= 1 and quality["predicted_psnr"] > 0


def test_negative_settings_are_user_errors():
    from lvm_pl.console import UserError

    with pytest.raises(UserError, match="context_frames=-1"):
        ev.TestEvaluation(LAYOUT, max_context=-1, next_frame_examples=0)
    with pytest.raises(UserError, match="model.evaluation: every setting must be >= 0"):
        EvalSettings(context_frames=-1)


def test_cli_test_on_token_shards_after_a_short_fit(tmp_path, repo_root):
    from lvm_pl import shards
    from main import cli

    layout = TokenLayout(codebook_size=32, tokens_per_image=4)
    rng = np.random.default_rng(0)

    def moving(n):  # a bar of ids sliding right one code per frame: learnable in a few steps
        return np.stack([(np.arange(4) + f) % 32 for f in range(n)])

    shards.write_split(tmp_path / "tokens/train", "train", layout, [moving(5)] * 40, ["sequence"] * 40)
    test_kinds = ["sequence", "analogy", "single", "sequence", "category", "sequence"]
    test_sizes = [5, 4, 1, 3, 3, 6]  # the 3-frame sequence is too short for a context study of 3 frames
    test = [
        moving(n) if k == "sequence" else rng.integers(0, 32, (n, 4))
        for k, n in zip(test_kinds, test_sizes, strict=True)
    ]
    shards.write_split(tmp_path / "tokens/test", "test", layout, test, test_kinds, shard_tokens=40)  # 3 shards
    small = "--model.overrides={n_layer: 2, n_embd: 32, n_head: 4, intermediate_size: 64}"
    lvm_config = str(repo_root / "configs/lvm/tiny.yaml")
    cli(
        ["fit", "-c", lvm_config, f"--data.train={tmp_path / 'tokens/train'}", "--data.val=null", small]
        + ["--data.seq_len=32", "--trainer.max_steps=8", "--trainer.enable_progress_bar=false"]
    )
    (ckpt,) = (tmp_path / "runs/lvm_tiny").rglob("last.ckpt")
    cli(
        ["test", "-c", lvm_config, "-c", str(repo_root / "configs/evaluate.yaml")]
        + ["-c", str(repo_root / "configs/data/tokens_eval.yaml"), f"--data.test={tmp_path / 'tokens/test'}"]
        + [
            "--data.seq_len=32",
            "--data.batch_size=2",
            small,
            "--model.evaluation.context_frames=3",
            f"--ckpt_path={ckpt}",
        ]
        + ["--trainer.enable_progress_bar=false"]
    )
    (run,) = (tmp_path / "runs/lvm_eval").iterdir()
    results = json.loads((run / report.RESULTS_FILE).read_text())
    counts = {k: v["examples"] for k, v in results["target_perplexity"].items()}
    assert counts == {"sequence": 3, "analogy": 1, "category": 1, "single": 1, "all": 6}
    # trained on sliding bars: their next frame is far more certain than random images
    assert (
        results["target_perplexity"]["sequence"]["perplexity"] < results["target_perplexity"]["analogy"]["perplexity"]
    )
    rows = results["context_length"]["rows"]
    assert [r["context_frames"] for r in rows] == [1, 2, 3] and rows[0]["examples"] == 2
    assert "frame 3 (0-based)" in results["context_length"]["frames"]
    assert any("next-frame quality needs pixel ground truth" in note for note in results["notes"])
    assert {p.name for p in run.glob("context_length.*")} == {
        "context_length.csv",
        "context_length.json",
        "context_length.png",
    }
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    curve = acc.Scalars("test/context_length/perplexity")
    assert [e.step for e in curve] == [1, 2, 3]
    assert [e.value for e in curve] == pytest.approx([r["perplexity"] for r in rows], rel=1e-5)
    assert {"test/target_perplexity", "test/target_perplexity/sequence"} <= set(acc.Tags()["scalars"])


def test_bos_free_shards_are_evaluated_by_their_shard_index(tmp_path):
    """The released LVM's layout has no BOS and no EOS: sentences cannot be found from the tokens, so the test run
    finds them from each window's stream position and the shard index, with their kinds; the context study's rows
    start without BOS."""
    from datamodules.tokens import TokenDataModule
    from lvm_pl import shards

    layout = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4, add_bos=False, add_eos=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 32, size=(n, 4)) for n in (3, 4, 2, 5, 3, 4)]
    kinds = ["sequence", "analogy", "sequence", "sequence", "category", "sequence"]
    shards.write_split(tmp_path / "test", "test", layout, images, kinds=kinds)
    data = TokenDataModule(test=str(tmp_path / "test"), seq_len=24, batch_size=2)
    overrides = {"block_size": 24, "n_embd": 32, "n_layer": 1, "n_head": 2, "intermediate_size": 64}
    model = LVM(preset="tiny", overrides=overrides, evaluation=EvalSettings(context_frames=2))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.test(model, data)
    results = json.loads((tmp_path / report.RESULTS_FILE).read_text())
    by_kind = {k: v["examples"] for k, v in results["target_perplexity"].items()}
    assert by_kind == {"sequence": 4, "analogy": 1, "category": 1, "all": 6}, by_kind
    assert results["context_length"]["rows"][0]["examples"] == 3  # the sequences of >= 3 frames
    assert "row = context target" in results["context_length"]["frames"]  # no [BOS]
    assert not any("kinds unknown" in n for n in results["notes"])
