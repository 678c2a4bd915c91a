"""The LVM's evaluation metrics as pure functions of tensors: no files, no loggers, no data modules.

Target perplexity (the official LVM evaluation): in every whole sentence the last image is the target and everything
before it the context; an example's perplexity is exp of the mean NLL over the target's tokens, and a group's
perplexity is the mean over its examples. Two numbers per example:

- `perplexity` (the headline): softmax over the codebook ids only. Inside an image only codebook ids can occur, so
  this is the model's distribution over the outcomes that exist; it does not depend on how many unused special ids
  the vocabulary carries, and a model that knows nothing scores exactly the codebook size.
- `perplexity_plain`: softmax over the whole vocabulary, as the training loss sees it (>= the headline).

The context-length study: for every sequence of at least K+1 frames, the target is frame K (0-based, the (K+1)-th
frame) and the context of length k = 1..K is frames K-k .. K-1 (the k frames right before it); each row is
`[BOS] f_{K-k} .. f_{K-1} f_K` (no BOS in a BOS-free layout), positions from 0, so only the number of context frames
changes, never the target.

Next-frame quality: greedy decoding (temperature 0) of the last image of sequences and analogies given the rest,
decoded by the tokenizer and compared with the true image (PSNR, SSIM), next to copying the last context frame
(sequences; for analogies that frame is the query) and the tokenizer's own reconstruction of the truth (the ceiling).
PSNR rewards a blur that hedges between positions, so three figures only the right drawing meets sit beside it:

- token accuracy: the share of the predicted frame's tokens equal to the tokens of the truth (copying: of the last
  frame's), i.e. whether the model drew the tokenizer's own picture of the answer;
- object position error: the objects are the pixels that differ from the background (the median colour of the
  truth's border) by more than `OBJECT_THRESHOLD` of the pixel range; the error is the distance in pixels between
  the centroid of those pixels in the prediction and in the truth;
- object presence: the prediction's object area is within a factor of 2 of the truth's (a blob that faded below the
  threshold, vanished or split into a smear is absent). The position error is averaged over present objects only,
  so read the two together. Both are also given for the tokenizer's reconstruction of the truth: the best an LVM
  that draws the right tokens can score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvm_pl import metrics
from lvm_pl.batches import Sentence, TokenBatch
from lvm_pl.kinds import kind_order
from lvm_pl.lvm.generation import GenerationSettings, generate
from lvm_pl.stage_data import SentenceIndex
from lvm_pl.tokens import TokenLayout


def batch_sentences(batch: TokenBatch, layout: TokenLayout, index: SentenceIndex | None = None) -> list[Sentence]:
    """The whole sentences of a token batch: as its maker listed them, else from the shard index at the rows' stream
    positions (kinds and numbers known), else from the layout's BOS/EOS (kinds unknown)."""
    if batch.sentences is not None:
        return batch.sentences
    length = batch.input_ids.shape[1] + 1  # the inputs and the last label
    if index is not None and batch.positions is not None:
        return [s for b, p in enumerate(batch.positions.tolist()) for s in index.whole_sentences(b, p, length, layout)]
    return [Sentence(b, s, n) for b in range(len(batch)) for s, n in layout.find_sentences(batch.row_tokens(b))]


def sentence_frames(batch: TokenBatch, sentence: Sentence, layout: TokenLayout) -> torch.Tensor:
    """A sentence's codebook ids [N, tokens_per_image], read from its row."""
    first = sentence.start + layout.image_start(0)
    tokens = batch.row_tokens(sentence.row)[first : first + sentence.num_images * layout.tokens_per_image]
    return tokens.view(sentence.num_images, layout.tokens_per_image)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """NLL (nats) of `targets` [...] under `logits` [..., V]: [..., 0] over the codebook ids, [..., 1] over all."""
    if not bool(((targets >= 0) & (targets < codebook_size)).all()):
        raise ValueError("evaluation targets must be codebook ids (an image holds nothing else)")
    logits, index = logits.float(), targets[..., None]
    restricted = -F.log_softmax(logits[..., :codebook_size], dim=-1).gather(-1, index)[..., 0]
    plain = -F.log_softmax(logits, dim=-1).gather(-1, index)[..., 0]
    return torch.stack([restricted, plain], dim=-1)


def has_target(sentence: Sentence, layout: TokenLayout) -> bool:
    """Every token of the last image is predicted from something (a BOS-free sentence of one image at the start of
    its row has no logit for its first token)."""
    return sentence.start + layout.image_start(sentence.num_images - 1) >= 1


def target_nll(logits: torch.Tensor, labels: torch.Tensor, sentences: list[Sentence], layout: TokenLayout):
    """Mean NLL of each sentence's last image given everything before it, [S, 2] (codebook-only, plain), from
    teacher-forced logits [B, T, V] (the logit at position p predicts label p, token p + 1)."""
    if not sentences:
        return torch.zeros(0, 2)
    tpi = layout.tokens_per_image
    rows = torch.tensor([s.row for s in sentences], device=labels.device)[:, None]  # [S, 1]
    first = torch.tensor([s.start + layout.image_start(s.num_images - 1) - 1 for s in sentences], device=labels.device)
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
    prefix = frames.new_tensor([layout.bos_id] if layout.add_bos else [])
    for context, target in context_frames(len(frames), max_context):
        row = torch.cat([prefix, frames[context + [target]].flatten()])[None, :-1]
        start = len(prefix) + len(context) * layout.tokens_per_image - 1  # the logit at p predicts token p + 1
        logits = model(row)[0, start:]  # [tpi, V]
        out.append(token_nll(logits, frames[target], layout.codebook_size).mean(0))
    return torch.stack(out).cpu() if out else torch.zeros(0, 2)


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
        psnr, ssim = metrics.psnr(image, truth), metrics.ssim(image, truth)
        out[f"{name}_psnr"], out[f"{name}_ssim"] = float(psnr[0]), float(ssim[0])
    out["predicted_token_accuracy"] = float((predicted[0] == codes[-1]).float().mean())
    out["copy_last_token_accuracy"] = float((codes[-2] == codes[-1]).float().mean())
    for name in candidates:  # the reconstruction's: the floor the tokenizer leaves the LVM
        out |= {f"{name}_{k}": v for k, v in object_match(candidates[name][0], truth[0]).items()}
    return out


OBJECT_THRESHOLD = 0.2  # of the pixel range: the built-in shapes contrast with their background by far more


def object_pixels(image: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: the pixels of `image` [3, H, W] in [-1, 1] farther than the threshold from `background` [3]."""
    return ((image - background[:, None, None]).abs().amax(0) / 2) > OBJECT_THRESHOLD


def object_match(image: torch.Tensor, truth: torch.Tensor) -> dict[str, float | None]:
    """`position_error` (pixels between object centroids; None when absent) and `present` (1.0/0.0) of the objects
    in `image` against `truth` ([3, H, W] each, in [-1, 1]); an empty dict when the truth shows no object."""
    border = torch.cat([truth[:, 0], truth[:, -1], truth[:, :, 0], truth[:, :, -1]], dim=1)  # [3, 2H + 2W]
    background = border.median(dim=1).values
    want, got = object_pixels(truth, background), object_pixels(image, background)
    if not want.any():
        return {}
    present = 0.5 <= got.sum().item() / want.sum().item() <= 2.0
    if not present:
        return {"position_error": None, "present": 0.0}
    yx = [torch.nonzero(m).float().mean(0) for m in (got, want)]
    return {"position_error": float((yx[0] - yx[1]).norm()), "present": 1.0}


def _by_kind(records: list[dict]) -> dict[str, list[dict]]:
    groups = {k: [r for r in records if r["kind"] == k] for k in kind_order(r["kind"] for r in records)}
    return {name: group for name, group in {**groups, "all": records}.items() if group}


def summarize_targets(records: list[dict]) -> dict[str, dict]:
    """Per kind and "all": examples, perplexity (mean over examples of exp(mean target NLL), codebook-only: the
    headline), perplexity_plain (whole vocabulary), nll and nll_plain (mean per-example NLL, nats)."""
    out = {}
    for name, group in _by_kind(records).items():
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
    """Per kind, per family (`family/<name>`, where the data names them) and "all": examples and the mean of every
    figure of `next_frame_quality` over the examples that have it (position errors: over present objects)."""
    groups = _by_kind(records)
    families = sorted({r["family"] for r in records if r.get("family")})
    groups |= {f"family/{f}": [r for r in records if r.get("family") == f] for f in families}
    out = {}
    for name, group in groups.items():
        fields = dict.fromkeys(f for r in group for f in r if f not in ("kind", "index", "family"))
        means = {}
        for f in fields:
            values = [r[f] for r in group if r.get(f) is not None]
            if values:
                means[f] = float(np.mean(values))
        out[name] = {"examples": len(group), **means}
    return out
