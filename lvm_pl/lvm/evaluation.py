"""Evaluating the LVM: perplexity of the target image given its context, the context-length study, next-frame quality.

Target perplexity (the official LVM evaluation): in every whole sentence `[BOS] img_1 .. img_N [EOS]` the last image
is the target and everything before it the context; an example's perplexity is exp of the mean NLL over the target's
tokens, and a group's perplexity is the mean over its examples. Two numbers per example:

- `perplexity` (the headline): softmax over the codebook ids only. Inside an image only codebook ids can occur, so
  this is the model's distribution over the outcomes that exist; it does not depend on how many unused special ids
  the vocabulary carries, and a model that knows nothing scores exactly the codebook size.
- `perplexity_plain`: softmax over the whole vocabulary, as the training loss sees it (>= the headline).

The context-length study: for every sequence of at least K+1 frames, the target is frame K (0-based, the (K+1)-th
frame) and the context of length k = 1..K is frames K-k .. K-1 (the k frames right before it); each row is
`[BOS] f_{K-k} .. f_{K-1} f_K`, positions from 0, so only the number of context frames changes, never the target.

Next-frame quality: greedy decoding (`generation.generate`, temperature 0) of the last image of sequences and
analogies given the rest, decoded by the tokenizer and compared with the true image (PSNR, SSIM), next to copying the
last context frame (sequences; for analogies that frame is the query) and the tokenizer's own reconstruction of the
truth (the ceiling).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvm_pl import atomic, metrics, shards
from lvm_pl.console import UserError, say
from lvm_pl.lvm.generation import GenerationSettings, generate
from lvm_pl.tokens import TokenLayout

KIND_ORDER = ("sequence", "analogy", "category", "single")
RESULTS_FILE = "lvm_test_results.json"
CONTEXT_FILE = "context_length"  # .csv, .json, .png


@dataclass(frozen=True)
class Span:
    """A whole sentence inside a token row: its BOS sits at `start`, its `num_images` images follow."""

    row: int
    start: int
    num_images: int


def find_sentences(batch: dict[str, torch.Tensor], layout: TokenLayout) -> list[Span]:
    """Whole sentences in a token batch ({"input_ids", "labels"} [B, T]); one cut by the window's end is left out."""
    if not (layout.add_bos and layout.add_eos):
        raise UserError(f"token layout {layout}: evaluation finds sentences by BOS and EOS; this layout lacks one")
    tpi, spans = layout.tokens_per_image, []
    for b in range(batch["input_ids"].shape[0]):
        bos = (batch["input_ids"][b] == layout.bos_id).nonzero().flatten().tolist()
        eos = (batch["labels"][b] == layout.eos_id).nonzero().flatten().tolist()  # label p is token p + 1
        for s in bos:
            e = next((p for p in eos if p >= s), None)
            if e is None or e == s:
                continue
            if (e - s) % tpi:
                raise ValueError(f"row {b}: sentence at {s} has {e - s} tokens, not whole images of {tpi}")
            spans.append(Span(b, s, (e - s) // tpi))
    return spans


def sentence_images(labels: torch.Tensor, span: Span, layout: TokenLayout) -> torch.Tensor:
    """A sentence's codebook ids [N, tokens_per_image], read from the labels (token p + 1 sits at label p)."""
    n = span.num_images * layout.tokens_per_image
    return labels[span.row, span.start : span.start + n].view(span.num_images, layout.tokens_per_image)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """NLL (nats) of `targets` [...] under `logits` [..., V]: [..., 0] over the codebook ids, [..., 1] over all."""
    if not bool(((targets >= 0) & (targets < codebook_size)).all()):
        raise ValueError("evaluation targets must be codebook ids (an image holds nothing else)")
    logits, index = logits.float(), targets[..., None]
    restricted = -F.log_softmax(logits[..., :codebook_size], dim=-1).gather(-1, index)[..., 0]
    plain = -F.log_softmax(logits, dim=-1).gather(-1, index)[..., 0]
    return torch.stack([restricted, plain], dim=-1)


def target_nll(logits: torch.Tensor, labels: torch.Tensor, spans: list[Span], layout: TokenLayout) -> torch.Tensor:
    """Mean NLL of each sentence's last image given everything before it, [S, 2] (codebook-only, plain), from
    teacher-forced logits [B, T, V] (the logit at position p predicts label p)."""
    if not spans:
        return torch.zeros(0, 2)
    tpi = layout.tokens_per_image
    rows = torch.tensor([s.row for s in spans], device=labels.device)[:, None]  # [S, 1]
    first = torch.tensor([s.start + (s.num_images - 1) * tpi for s in spans], device=labels.device)
    pos = first[:, None] + torch.arange(tpi, device=labels.device)  # [S, tpi]
    return token_nll(logits[rows, pos], labels[rows, pos], layout.codebook_size).mean(1).cpu()  # [S, 2]


def context_frames(num_frames: int, max_context: int) -> list[tuple[list[int], int]]:
    """The frames the context-length study evaluates: for k = 1..K, (context frame indices, target index);
    empty when the sequence has fewer than K + 1 frames."""
    if num_frames <= max_context:
        return []
    return [(list(range(max_context - k, max_context)), max_context) for k in range(1, max_context + 1)]


@torch.no_grad()
def context_length_nll(
    model: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, max_context: int, layout: TokenLayout
) -> torch.Tensor:
    """Mean NLL [K, 2] (codebook-only, plain) of frame K of `frames` [N, tokens_per_image] given its k = 1..K
    preceding frames, one forward each (rows differ in length, and long rows' logits are large)."""
    out = []
    for context, target in context_frames(len(frames), max_context):
        picked = frames[context + [target]].flatten()
        row = torch.cat([picked.new_tensor([layout.bos_id]), picked])[None, :-1]  # [1, 1 + (k+1)*tpi - 1]
        start = len(context) * layout.tokens_per_image  # the logit at p predicts token p + 1
        logits = model(row)[0, start:]  # [tpi, V]
        out.append(token_nll(logits, frames[target], layout.codebook_size).mean(0))
    return torch.stack(out).cpu() if out else torch.zeros(0, 2)


def image_quality(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR (dB) and SSIM [B] of images [B, 3, H, W] in [-1, 1], as `lvm_pl.metrics` (skimage's) computes them."""
    return metrics.psnr(pred, truth), metrics.ssim(pred, truth)


@torch.no_grad()
def next_frame_quality(model: nn.Module, tokenizer: nn.Module, images: torch.Tensor, layout: TokenLayout) -> dict:
    """Greedy prediction of the last of `images` [N, 3, H, W] (N >= 2) from the others, decoded, against the truth:
    PSNR/SSIM of the prediction, of copying image N-1 (the last frame, or an analogy's query), of the reconstruction."""
    codes = tokenizer.encode(images)  # [N, h, w]
    prompt = codes[None, :-1].flatten(2)  # [1, N-1, tokens_per_image]
    predicted = generate(model, prompt, 1, layout, GenerationSettings(temperature=0.0)).view(1, *codes.shape[1:])
    truth = images[-1:]
    candidates = {
        "predicted": tokenizer.decode(predicted),
        "copy_last": images[-2:-1],
        "reconstruction": tokenizer.decode(codes[-1:]),
    }
    out = {}
    for name, image in candidates.items():
        psnr, ssim = image_quality(image, truth)
        out[f"{name}_psnr"], out[f"{name}_ssim"] = float(psnr[0]), float(ssim[0])
    return out


def _kind_order(kinds: set[str]) -> list[str]:
    return [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))


def summarize_targets(records: list[dict]) -> dict[str, dict]:
    """Per kind and "all": examples, perplexity (mean over examples of exp(mean target NLL), codebook-only: the
    headline), perplexity_plain (whole vocabulary), nll and nll_plain (mean per-example NLL, nats)."""
    groups = {k: [r for r in records if r["kind"] == k] for k in _kind_order({r["kind"] for r in records})}
    out = {}
    for name, group in {**groups, "all": records}.items():
        if not group:
            continue
        nll = np.array([r["nll"] for r in group])
        plain = np.array([r["nll_plain"] for r in group])
        out[name] = {
            "examples": len(group),
            "perplexity": float(np.exp(nll).mean()),
            "perplexity_plain": float(np.exp(plain).mean()),
            "nll": float(nll.mean()),
            "nll_plain": float(plain.mean()),
        }
    return out


def summarize_context(records: list[dict], max_context: int) -> list[dict]:
    """Table rows for k = 1..K: examples, perplexity (codebook-only), perplexity_plain, nll, nll_plain."""
    if not records:
        return []
    nll = np.array([r["nll"] for r in records])  # [E, K]
    plain = np.array([r["nll_plain"] for r in records])
    return [
        {
            "context_frames": k + 1,
            "examples": len(records),
            "perplexity": float(np.exp(nll[:, k]).mean()),
            "perplexity_plain": float(np.exp(plain[:, k]).mean()),
            "nll": float(nll[:, k].mean()),
            "nll_plain": float(plain[:, k].mean()),
        }
        for k in range(max_context)
    ]


def summarize_next_frame(records: list[dict]) -> dict[str, dict]:
    """Per kind and "all": examples and the mean of every PSNR/SSIM field of `next_frame_quality`."""
    groups = {k: [r for r in records if r["kind"] == k] for k in _kind_order({r["kind"] for r in records})}
    out = {}
    for name, group in {**groups, "all": records}.items():
        if group:
            fields = [f for f in group[0] if f.endswith(("_psnr", "_ssim"))]
            out[name] = {"examples": len(group), **{f: float(np.mean([r[f] for r in group])) for f in fields}}
    return out


def write_context_table(directory: str | Path, rows: list[dict], description: str) -> list[Path]:
    """Write `context_length.{csv,json,png}` (atomically) into `directory`; returns the paths."""
    directory = Path(directory)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [directory / f"{CONTEXT_FILE}.{ext}" for ext in ("csv", "json", "png")]
    atomic.write_text(paths[0], buf.getvalue())
    atomic.write_json(paths[1], {"frames": description, "rows": rows})
    atomic.write_bytes(paths[2], context_plot(rows))
    return paths


def context_plot(rows: list[dict]) -> bytes:
    """PNG bytes of perplexity against the number of context frames (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    k = [r["context_frames"] for r in rows]
    ax.plot(k, [r["perplexity"] for r in rows], marker="o", label="codebook ids (headline)")
    ax.plot(k, [r["perplexity_plain"] for r in rows], marker=".", linestyle="--", label="whole vocabulary")
    ax.set_xlabel("context frames")
    ax.set_ylabel("perplexity of the target frame")
    ax.set_title(f"context length ({rows[0]['examples']} sequences)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class ShardKinds:
    """Kind and stream number of every sentence of a TokenDataModule split, looked up by stream position."""

    def __init__(self, manifests: list[shards.Manifest], sentence_starts: np.ndarray) -> None:
        kinds = []
        for m in manifests:
            for s in m.shards:
                index = shards.read_shard_index(m.idx_path(s))
                kinds += [index.kinds[k] for k in index.kind]
        if len(kinds) != len(sentence_starts):
            raise UserError(
                f"{manifests[0].path}: shard indexes list {len(kinds)} kinds for {len(sentence_starts)} sentences"
            )
        self.kinds, self.starts = kinds, sentence_starts

    def lookup(self, position: int) -> tuple[str, int]:
        """(kind, sentence number) of the sentence starting at stream `position`."""
        s = int(np.searchsorted(self.starts, position))
        if s == len(self.starts) or self.starts[s] != position:
            raise RuntimeError(f"no sentence starts at stream position {position}: window order is not the loader's")
        return self.kinds[s], s


def shard_locator(trainer) -> Callable[[int, int, int], tuple[str, int]] | None:
    """For a TokenDataModule test run, name sentences by (batch_idx, row, start) from the test loader's window order
    and the shard indexes' kinds; None for data modules without token windows."""
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "datasets", {}).get("test")
    if not (hasattr(dataset, "stream") and hasattr(dataset, "starts")):
        return None
    loader = trainer.test_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    order = list(loader.sampler)  # this rank's windows, in the order its batches come
    kinds = ShardKinds(datamodule.manifests["test"], dataset.stream.sentence_starts)

    def locate(batch_idx: int, row: int, start: int) -> tuple[str, int]:
        window = order[batch_idx * loader.batch_size + row]
        return kinds.lookup(int(dataset.starts[window]) + start)

    return locate


class TestEvaluation:
    """Collects target perplexities, the context-length study and next-frame quality over one `test` epoch.

    `locate(batch_idx, row, start) -> (kind, index)` names the sentence at `start` of a token row (index None: not
    known); sentence batches name theirs. `max_context` 0 skips the study, `next_frame_examples` 0 the generation.
    """

    def __init__(
        self,
        layout: TokenLayout,
        max_context: int,
        next_frame_examples: int,
        locate: Callable[[int, int, int], tuple[str, int | None]] | None = None,
    ) -> None:
        if max_context < 0 or next_frame_examples < 0:
            raise UserError(
                f"model: context_frames={max_context} and next_frame_examples={next_frame_examples} must be >= 0"
            )
        self.layout, self.max_context, self.next_frame_examples = layout, max_context, next_frame_examples
        self.locate = locate
        self.targets: list[dict] = []
        self.context: list[dict] = []
        self.next_frame: list[dict] = []
        self.notes: set[str] = set()

    def update(
        self,
        model: nn.Module,
        batch: dict,
        tokens: dict[str, torch.Tensor],
        logits: torch.Tensor,
        batch_idx: int,
        tokenizer: nn.Module | None = None,
    ) -> None:
        """Add one test batch: `batch` as the loader gave it, `tokens` its token rows, `logits` [B, T, V] of them."""
        spans = find_sentences(tokens, self.layout)
        nll = target_nll(logits, tokens["labels"], spans, self.layout)
        for span, (restricted, plain) in zip(spans, nll.tolist(), strict=True):
            kind, index = self._name(batch, batch_idx, span)
            self.targets.append({"kind": kind, "index": index, "nll": restricted, "nll_plain": plain})
            frames = sentence_images(tokens["labels"], span, self.layout)
            if self.max_context and kind == "sequence":
                if span.num_images > self.max_context:
                    study = context_length_nll(model, frames, self.max_context, self.layout)
                    nll_k, plain_k = study.T.tolist()
                    self.context.append({"index": index, "nll": nll_k, "nll_plain": plain_k})
                else:
                    self.notes.add(f"context study: sequences shorter than {self.max_context + 1} frames are skipped")
            if len(self.next_frame) < self.next_frame_examples and kind in ("sequence", "analogy"):
                self._next_frame(model, batch, span, kind, index, tokenizer)

    def _name(self, batch: dict, batch_idx: int, span: Span) -> tuple[str, int | None]:
        if "images" in batch:  # a sentence batch: one sentence per row
            return batch["kind"][span.row], int(batch["index"][span.row])
        if self.locate is not None:
            return self.locate(batch_idx, span.row, span.start)
        self.notes.add("kinds unknown: token batches from a data module without shard indexes")
        return "unknown", None

    def _next_frame(self, model, batch, span, kind, index, tokenizer) -> None:
        if "images" not in batch or tokenizer is None:
            self.notes.add(
                "next-frame quality needs pixel ground truth and a tokenizer: sentence data"
                " (VisualSentenceDataModule, unit=sentence) and model.tokenizer"
            )
            return
        if span.num_images < 2:
            return
        images = batch["images"][span.row, : span.num_images]  # [N, 3, H, W]
        quality = next_frame_quality(model, tokenizer, images, self.layout)
        self.next_frame.append({"kind": kind, "index": index, **quality})

    def finish(self, trainer) -> dict[str, float]:
        """Gather every rank's records, write the results into the run directory (rank zero), return the scalars."""
        parts = _gather(trainer, {"targets": self.targets, "context": self.context, "next_frame": self.next_frame})
        targets = _unique([r for p in parts for r in p["targets"]])
        context = _unique([r for p in parts for r in p["context"]])
        next_frame = _unique([r for p in parts for r in p["next_frame"]])[: self.next_frame_examples]
        notes = sorted(set().union(*(p for p in _gather(trainer, self.notes))))
        table = summarize_context(context, self.max_context)
        results = {
            "headline": "target_perplexity.all.perplexity: exp(mean NLL of the target image, codebook ids only),"
            " averaged over examples",
            "target_perplexity": summarize_targets(targets),
            "context_length": {"frames": self.context_description(), "rows": table},
            "next_frame": summarize_next_frame(next_frame),
            "notes": notes,
        }
        if trainer.is_global_zero:
            directory = Path(trainer.log_dir or trainer.default_root_dir)
            if table:
                write_context_table(directory, table, self.context_description())
                _context_scalars(trainer, table)
            elif self.max_context:
                say(f"context study: no test sequence has {self.max_context + 1} frames; nothing to plot")
            atomic.write_json(directory / RESULTS_FILE, results)
            say(f"LVM test results: {directory / RESULTS_FILE}")
        return _scalars(results)

    def context_description(self) -> str:
        k = self.max_context
        return (
            f"target = frame {k} (0-based) of every test sequence with >= {k + 1} frames; context of k frames ="
            f" frames {k}-k .. {k - 1}, for k = 1..{k}; row = [BOS] context target, positions from 0"
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


def _scalars(results: dict) -> dict[str, float]:
    out = {}
    for kind, s in results["target_perplexity"].items():
        suffix = "" if kind == "all" else f"/{kind}"
        out[f"test/target_perplexity{suffix}"] = s["perplexity"]
        out[f"test/target_perplexity_plain{suffix}"] = s["perplexity_plain"]
    for kind, s in results["next_frame"].items():
        suffix = "" if kind == "all" else f"/{kind}"
        for field in ("predicted_psnr", "predicted_ssim", "copy_last_psnr", "copy_last_ssim"):
            out[f"test/next_frame/{field}{suffix}"] = s[field]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _context_scalars(trainer, table: list[dict]) -> None:
    """TensorBoard scalars with the number of context frames as the step (self.log cannot choose the step)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for row in table:
                logger.experiment.add_scalar("test/context_length/perplexity", row["perplexity"], row["context_frames"])
                logger.experiment.add_scalar(
                    "test/context_length/perplexity_plain", row["perplexity_plain"], row["context_frames"]
                )
            logger.experiment.flush()
