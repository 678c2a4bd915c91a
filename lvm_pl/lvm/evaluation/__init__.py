"""Evaluating the LVM over one `test` epoch: target perplexity by kind, the context-length study, next-frame quality.

`metrics` holds the math (pure functions), `report` the files, plot and TensorBoard scalars; `TestEvaluation` collects
records batch by batch, gathers them across ranks and hands them to both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lvm_pl.batches import SentenceBatch, TokenBatch
from lvm_pl.console import UserError, say
from lvm_pl.kinds import NEXT_FRAME
from lvm_pl.lvm.evaluation import metrics, report
from lvm_pl.stage_data import SentenceIndex
from lvm_pl.tokens import TokenLayout


class TestEvaluation:
    """Collects target perplexities, the context-length study and next-frame quality over one `test` epoch.

    Sentences are named (kind, number) by the token batch's maker or by `index`, the test split's shard index; token
    batches without either get kind "unknown". `max_context` 0 skips the study, `next_frame_examples` 0 the generation.
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(
        self, layout: TokenLayout, max_context: int, next_frame_examples: int, index: SentenceIndex | None = None
    ) -> None:
        if max_context < 0 or next_frame_examples < 0:
            raise UserError(
                f"model: context_frames={max_context} and next_frame_examples={next_frame_examples} must be >= 0"
            )
        self.layout, self.max_context, self.next_frame_examples = layout, max_context, next_frame_examples
        self.index = index
        self.targets: list[dict] = []
        self.context: list[dict] = []
        self.next_frame: list[dict] = []
        self.notes: set[str] = set()

    def update(
        self,
        model: nn.Module,
        batch: SentenceBatch | TokenBatch,
        tokens: TokenBatch,
        logits: torch.Tensor,
        tokenizer: nn.Module | None = None,
    ) -> None:
        """Add one test batch: `batch` as the loader gave it, `tokens` its token rows, `logits` [B, T, V] of them."""
        found = metrics.batch_sentences(tokens, self.layout, self.index)
        sentences = [s for s in found if metrics.has_target(s, self.layout)]
        if tokens.sentences is None and (self.index is None or tokens.positions is None):
            self.notes.add("kinds unknown: token batches from a data module without shard indexes")
        nll = metrics.target_nll(logits, tokens.labels, sentences, self.layout)
        for s, (restricted, plain) in zip(sentences, nll.tolist(), strict=True):
            self.targets.append({"kind": s.kind, "index": s.index, "nll": restricted, "nll_plain": plain})
            if self.max_context and s.kind == "sequence":
                if s.num_images > self.max_context:
                    frames = metrics.sentence_frames(tokens, s, self.layout)
                    nll_k, plain_k = metrics.context_length_nll(model, frames, self.max_context, self.layout).T.tolist()
                    self.context.append({"index": s.index, "nll": nll_k, "nll_plain": plain_k})
                else:
                    self.notes.add(f"context study: sequences shorter than {self.max_context + 1} frames are skipped")
            if len(self.next_frame) < self.next_frame_examples and s.kind in NEXT_FRAME and s.num_images >= 2:
                self._next_frame(model, batch, s, tokenizer)

    def _next_frame(self, model, batch, sentence, tokenizer) -> None:
        if not isinstance(batch, SentenceBatch) or tokenizer is None:
            self.notes.add(
                "next-frame quality needs pixel ground truth and a tokenizer: sentence data"
                " (VisualSentenceDataModule, unit=sentence) and model.tokenizer"
            )
            return
        images = batch.images[sentence.row, : sentence.num_images]  # [N, 3, H, W]
        quality = metrics.next_frame_quality(model, tokenizer, images, self.layout)
        family = batch.families[sentence.row] if batch.families else None
        self.next_frame.append({"kind": sentence.kind, "index": sentence.index, "family": family, **quality})

    def finish(self, trainer) -> dict[str, float]:
        """Gather every rank's records, write the results into the run directory (rank zero), return the scalars."""
        parts = _gather(trainer, {"targets": self.targets, "context": self.context, "next_frame": self.next_frame})
        targets = _unique([r for p in parts for r in p["targets"]])
        context = _unique([r for p in parts for r in p["context"]])
        next_frame = _unique([r for p in parts for r in p["next_frame"]])[: self.next_frame_examples]
        notes = sorted(set().union(*(p for p in _gather(trainer, self.notes))))
        table = metrics.summarize_context(context, self.max_context)
        results = {
            "headline": "target_perplexity.all.perplexity: exp(mean NLL of the target image, codebook ids only),"
            " averaged over examples",
            "target_perplexity": metrics.summarize_targets(targets),
            "context_length": {"frames": self.context_description(), "rows": table},
            "next_frame": metrics.summarize_next_frame(next_frame),
            "notes": notes,
        }
        if trainer.is_global_zero:
            directory = Path(trainer.log_dir or trainer.default_root_dir)
            if table:
                report.write_context_table(directory, table, self.context_description(), results["next_frame"])
                report.log_context_scalars(trainer.loggers, table)
            elif self.max_context:
                say(f"context study: no test sequence has {self.max_context + 1} frames; nothing to plot")
            for line in report.summary_lines(results):
                say(line)
            say(f"LVM test results: {report.write_results(directory, results)}")
        return report.scalars(results)

    def context_description(self) -> str:
        k, bos = self.max_context, "[BOS] " if self.layout.add_bos else ""
        return (
            f"target = frame {k} (0-based) of every test sequence with >= {k + 1} frames; context of k frames ="
            f" frames {k}-k .. {k - 1}, for k = 1..{k}; row = {bos}context target, positions from 0"
        )


def _gather(trainer, obj):
    """Every rank's `obj` (a list of one without a process group)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _unique(records: list[dict]) -> list[dict]:
    """Drop repeats of a known sentence index (distributed samplers pad ranks with repeated examples)."""
    seen, out = set(), []
    for r in records:
        if r["index"] is None or r["index"] not in seen:
            seen.add(r["index"])
            out.append(r)
    return out
