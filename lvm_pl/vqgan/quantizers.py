"""Quantizers onto a discrete code set, swappable by class_path: a vector quantizer (with EMA, cosine codes, a
low-dimensional code space, data init and dead-code restart) and FSQ (finite scalar quantization, no codebook)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """quantized [B, C, h, w] (straight-through), indices LongTensor [B, h, w], loss (scalar), batch counts [K]."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    counts: torch.Tensor


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when distributed, so statistics and EMA codebooks agree everywhere."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Quantizer(nn.Module):
    """Base class: maps latents [B, embed_dim, h, w] to codes; keeps a window of recent usage counts."""

    def __init__(self, codebook_size: int, embed_dim: int, usage_window: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        # [window, K] code counts of recent training batches, for usage / perplexity / dead-code logging; both
        # persistent, so a resumed run logs the same window as an uninterrupted one
        self.register_buffer("recent_counts", torch.zeros(usage_window, codebook_size))
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        raise NotImplementedError

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, h, w] -> quantized latents [B, embed_dim, h, w]."""
        raise NotImplementedError

    def record(self, counts: torch.Tensor) -> None:
        """Add one training batch's code counts [K] to the usage window."""
        self.recent_counts[self.next_slot % self.recent_counts.shape[0]] = _all_reduce(counts.detach().float().clone())
        self.next_slot.add_(1)

    def usage_stats(self, counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Fraction of codes used, perplexity and dead codes over `counts` [K] (default: the recent window)."""
        total = self.recent_counts.sum(0) if counts is None else counts.float()
        p = total / total.sum().clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        used = (total > 0).sum()
        return {
            "usage": used.float() / self.codebook_size,
            "perplexity": entropy.exp(),
            "dead_codes": (self.codebook_size - used).float(),
        }


class VectorQuantizer(Quantizer):
    """Nearest-code quantizer with straight-through gradients.

    loss = codebook_weight * ||zq - sg(z)||^2 + beta * ||sg(zq) - z||^2 (beta on the encoder term); with `ema_decay`
    the codebook follows EMA cluster means instead of the codebook term.
    """

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        code_dim: int | None = None,
        beta: float = 0.25,
        normalize: bool = False,
        ema_decay: float | None = None,
        init_from_data: bool = False,
        dead_code_threshold: float = 0.0,
        usage_window: int = 100,
    ):
        """`code_dim` < embed_dim looks codes up in a low-dimensional space (linear projections in and out);
        `dead_code_threshold` > 0 restarts codes whose EMA cluster size falls below it from recent encoder outputs."""
        super().__init__(codebook_size, embed_dim, usage_window)
        self.code_dim = code_dim or embed_dim
        self.beta = beta
        self.normalize = normalize
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        if self.code_dim != embed_dim:
            self.project_in = nn.Linear(embed_dim, self.code_dim)
            self.project_out = nn.Linear(self.code_dim, embed_dim)
        else:
            self.project_in = self.project_out = None
        codebook = torch.empty(codebook_size, self.code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema_decay is None:
            self.embedding = nn.Embedding(codebook_size, self.code_dim, _weight=codebook)
        else:
            # EMA codebooks are not trained by the optimizer: plain buffers, fixed from construction on
            self.embedding = nn.Embedding(codebook_size, self.code_dim, _weight=codebook, _freeze=True)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", codebook.clone())
        # cluster sizes tracked for dead-code restart even without EMA codebook updates
        self.register_buffer("usage_ema", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(not init_from_data))

    @property
    def codebook(self) -> torch.Tensor:
        """[K, code_dim] code vectors in the space distances are taken in."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.normalize else w

    def _lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code for each row of flat [N, code_dim], in fp32 whatever the autocast dtype."""
        with torch.autocast(flat.device.type, enabled=False):
            codes = self.codebook
            # ||x||^2 - 2 x.c + ||c||^2, without materialising [N, K, D]
            dist_ = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
            return dist_.argmin(1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()  # [N, embed_dim]
        if self.project_in is not None:
            flat = self.project_in(flat).float()
        if self.normalize:
            flat = F.normalize(flat, dim=-1)
        if self.training and not bool(self.initialized):
            self._init_from(flat.detach())
        indices = self._lookup(flat.detach())
        zq = self.codebook[indices]  # [N, code_dim]
        counts = torch.bincount(indices, minlength=self.codebook_size)
        commit = F.mse_loss(flat, zq.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(zq, flat.detach()) + self.beta * commit
        else:
            loss = self.beta * commit
        if self.training:
            self._update(flat.detach(), indices, counts)
        zq = flat + (zq - flat).detach()  # straight-through: gradients reach the encoder unchanged
        if self.project_out is not None:
            zq = self.project_out(zq)
        quantized = zq.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2).to(z.dtype)
        return QuantizerOutput(quantized, indices.reshape(b, h, w), loss, counts)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        zq = self.codebook[indices]  # [B, h, w, code_dim]
        if self.project_out is not None:
            zq = self.project_out(zq)
        return zq.permute(0, 3, 1, 2)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Codes := random encoder outputs of the first batch (repeated with a little noise when there are fewer)."""
        picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        picks[: min(flat.shape[0], self.codebook_size)] = torch.randperm(flat.shape[0], device=flat.device)[
            : self.codebook_size
        ]
        codes = flat[picks] + 1e-3 * flat.std() * torch.randn_like(flat[picks])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(codes, 0)
        self._set_codes(codes)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _set_codes(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        mask = torch.ones(self.codebook_size, dtype=torch.bool, device=codes.device) if mask is None else mask
        self.embedding.weight.data[mask] = codes[mask].to(self.embedding.weight.dtype)
        if self.ema_decay is not None:
            self.cluster_size[mask] = 1.0
            self.embed_sum[mask] = codes[mask].float()
        self.usage_ema[mask] = 1.0

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook step and dead-code restart (statistics summed over ranks); skipped on non-finite latents,
        whose step the module stops or skips, so the codebook never takes NaNs in."""
        if not torch.isfinite(_all_reduce(flat.sum().reshape(1))).all():
            return
        counts = _all_reduce(counts.float())
        decay = 0.99 if self.ema_decay is None else self.ema_decay
        self.usage_ema.mul_(decay).add_(counts, alpha=1 - decay)
        if self.ema_decay is not None:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # [K, D]
            sums = _all_reduce(sums)
            self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace smoothing
            self.embedding.weight.data.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = self.usage_ema < self.dead_code_threshold
            if dead.any():
                picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
                codes = flat[picks]
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(codes, 0)
                    dist.broadcast(dead, 0)
                self._set_codes(codes, dead)


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): each latent channel is bounded and rounded to `levels[i]`
    values; the code id is the mixed-radix number of the rounded channels. No codebook, no auxiliary loss."""

    def __init__(self, levels: list[int], embed_dim: int, usage_window: int = 100):
        codebook_size = 1
        for level in levels:
            codebook_size *= level
        super().__init__(codebook_size, embed_dim, usage_window)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0), persistent=False)
        d = len(levels)
        self.project_in = nn.Conv2d(embed_dim, d, 1) if d != embed_dim else None
        self.project_out = nn.Conv2d(d, embed_dim, 1) if d != embed_dim else None

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """[B, d, h, w] -> values in (-L/2, L/2) per channel, shifted so even levels round symmetrically."""
        levels = self.levels.view(1, -1, 1, 1).float()
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        h = z if self.project_in is None else self.project_in(z)
        with torch.autocast(z.device.type, enabled=False):
            bounded = self.bound(h.float())
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
            half_width = (self.levels // 2).view(1, -1, 1, 1).float()
            codes = rounded / half_width  # [B, d, h, w] in [-1, 1]
            digits = (rounded.detach() + half_width).long()  # [B, d, h, w] in [0, L)
            indices = (digits * self.basis.view(1, -1, 1, 1)).sum(1)
        quantized = codes if self.project_out is None else self.project_out(codes)
        counts = torch.bincount(indices.flatten(), minlength=self.codebook_size)
        return QuantizerOutput(quantized.to(z.dtype), indices, z.new_zeros(()).float(), counts)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(1) // self.basis.view(1, -1, 1, 1)) % self.levels.view(1, -1, 1, 1)
        half_width = (self.levels // 2).view(1, -1, 1, 1).float()
        codes = (digits.float() - half_width) / half_width
        return codes if self.project_out is None else self.project_out(codes)
