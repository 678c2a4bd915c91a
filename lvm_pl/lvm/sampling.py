"""Turning next-token logits into ids: special-id suppression, temperature, top-k, top-p, seeded draws.

Inside a generated image every token must be a codebook entry. The codebook owns ids `0 .. codebook_size-1` and the
special block (BOS, EOS, ...) follows it, so the logits are cut to their codebook prefix before anything else: index
`i` of what remains is id `i`, and no special id can be drawn. `temperature == 0` is greedy (argmax).
"""

from __future__ import annotations

import torch

from lvm_pl.console import UserError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `UserError` for settings no sampler can honour (named as the generation config keys)."""
    if temperature < 0:
        raise UserError(f"generation.temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"generation.top_k={top_k}: must be >= 1, or null for no top-k")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"generation.top_p={top_p}: must be in (0, 1], or null for no top-p")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits of each row [..., V] (ties at the k-th value are all kept); the rest -> -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely ids whose probability sums to >= `p` (always the top one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # an id is dropped when the mass strictly before it already reaches p
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    codebook_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Float32 logits [B, V] -> [B, codebook_size] ready to sample: codebook ids only (cut, not masked: cheaper per
    step), divided by temperature, then top-k, then top-p."""
    logits = logits[..., :codebook_size].float()
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return logits


def sample(
    logits: torch.Tensor,
    codebook_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next codebook ids [B] from logits [B, V]: argmax when `temperature == 0`, else a draw from the filtered
    softmax."""
    if temperature == 0:
        return logits[..., :codebook_size].argmax(-1)  # top-k / top-p never change the argmax
    logits = process_logits(logits, codebook_size, temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
