"""The LLaMA decoder: embedding -> pre-norm blocks (RMSNorm, rotary attention, SwiGLU MLP) -> RMSNorm -> head.

Parameter names follow Hugging Face's `LlamaForCausalLM` (without its `model.` prefix) and rotary embeddings use the
same rotate-half layout on the full head, so converting weights either way is a rename.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from lvm_pl.lvm.config import LVMConfig


class LLaMA(nn.Module):
    """Decoder-only transformer. `forward(idx[B,T], input_pos=None, doc_ids=None) -> logits[B,T,V]`."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from the embedding
        self.activation_checkpointing = False
        # cos, sin [block_size, head_size]: one table per device, built on first use (not a buffer, so a model built
        # on the meta device and materialised later never holds an uninitialised table)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix and the embedding; ones for the norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def setup_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Preallocate a static key/value cache of `max_seq_length` positions in every layer."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's block_size={self.config.block_size}")
        weight = self.embed_tokens.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        shape = (batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size)
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(shape, device, dtype)

    def clear_kv_cache(self) -> None:
        """Drop the caches (training and plain forwards do not use them)."""
        for block in self.layers:
            block.self_attn.kv_cache = None

    @contextlib.contextmanager
    def fused_projections(self, on: bool = True) -> Iterator[None]:
        """Inside: q/k/v and gate/up weights stacked, one matmul each instead of five (a decode step is bound by
        per-op overhead). Copies, made on entry and dropped on exit (the weights may change between calls): about
        70% of the weights' memory again while inside. Not under ZeRO-3 (weights partitioned away: left unfused)."""
        on = on and all(p.numel() for p in self.parameters())
        modules = [m for block in self.layers for m in (block.self_attn, block.mlp)]
        try:
            for m in modules:
                m.fuse(on)
            yield
        finally:
            for m in modules:
                m.fuse(False)

    def rope(self, pos: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_size] at positions `pos` [T] (an int T: positions 0..T-1, a view of the table)."""
        device = self.embed_tokens.weight.device
        if self._rope is None or self._rope[0].device != device:
            positions = torch.arange(self.config.block_size, device=device)
            self._rope = rope_cache(positions, self.config.head_size, self.config.rope_base)
        cos, sin = self._rope
        return (cos[:pos], sin[:pos]) if isinstance(pos, int) else (cos[pos], sin[pos])

    def _cache_mask(self, input_pos: torch.Tensor) -> torch.Tensor | None:
        """None for one eager decode token (it attends over the filled prefix, unmasked); else [T, S] additive:
        a query at position p sees cached positions <= p (static shapes, for prefill and compiled steps)."""
        if len(input_pos) == 1 and not torch.compiler.is_compiling():
            return None
        cache_len = self.layers[0].self_attn.kv_cache.k.shape[2]
        allowed = torch.arange(cache_len, device=input_pos.device)[None, :] <= input_pos[:, None]
        return additive(allowed, self._compute_dtype())

    def _compute_dtype(self) -> torch.dtype:
        device_type = self.embed_tokens.weight.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.embed_tokens.weight.dtype

    def _mask_kind(self, idx: torch.Tensor) -> str:
        """`flex`, `chunked` or `dense`: doc_mask true picks flex attention on CUDA, chunked SDPA elsewhere (CPU flex
        attention has no backward)."""
        if self.config.doc_mask is True:
            return "flex" if idx.is_cuda else "chunked"
        return self.config.doc_mask

    @property
    def has_kv_cache(self) -> bool:
        return self.layers[0].self_attn.kv_cache is not None

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V]. `input_pos` [T] (needs a KV cache) are the positions of `idx`; `doc_ids` [B, T] blocks
        attention between documents packed into one window (positions stay global); `last_only`: the last position's
        logits only, [B, 1, V] (a prefill needs no others: the head over every prompt token would cost more than the
        whole rest of a long prompt's forward at small sizes)."""
        seq_len = idx.shape[1]
        if input_pos is not None:
            if not self.has_kv_cache:
                raise ValueError("forward with input_pos needs a KV cache: call setup_kv_cache first")
            if doc_ids is not None:
                raise ValueError("doc_ids are for packed training windows, not for cached generation")
            cos, sin = self.rope(input_pos)
            mask = self._cache_mask(input_pos)
        else:
            if seq_len > self.config.block_size:
                raise ValueError(f"sequence of {seq_len} tokens exceeds block_size={self.config.block_size}")
            cos, sin = self.rope(seq_len)
            mask = None
            if doc_ids is not None and self.config.doc_mask:  # built once per forward, shared by every layer
                kind = self._mask_kind(idx)
                mask = document_mask(doc_ids, kind, self._compute_dtype(), self.config.attention_chunk)
        x = self.embed_tokens(idx)  # [B, T, C]
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, V]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = CausalSelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) attention with rotary embeddings, through `scaled_dot_product_attention`."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        hs, groups = config.head_size, config.n_query_groups
        self.n_head, self.n_query_groups, self.head_size = config.n_head, groups, hs
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=False)
        self.k_proj = nn.Linear(config.n_embd, groups * hs, bias=False)
        self.v_proj = nn.Linear(config.n_embd, groups * hs, bias=False)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None
        self.fused: torch.Tensor | None = None  # q, k, v weights stacked while `fused_projections` is on

    def fuse(self, on: bool) -> None:
        weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        self.fused = torch.cat(weights).detach() if on else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, ng, hs = self.n_head, self.n_query_groups, self.head_size
        if self.fused is not None:  # one matmul and one rotation for q and k together
            qkv = F.linear(x, self.fused).view(B, T, nh + 2 * ng, hs).transpose(1, 2)  # [B, nh + 2ng, T, hs]
            q, k = apply_rope(qkv[:, : nh + ng], cos, sin).split([nh, ng], dim=1)
            v = qkv[:, nh + ng :]
        else:
            q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # [B, nh, T, hs]
            k = self.k_proj(x).view(B, T, ng, hs).transpose(1, 2)  # [B, ng, T, hs]
            v = self.v_proj(x).view(B, T, ng, hs).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)  # [B, ng, S, hs]: everything cached so far
            if mask is None:  # one eager decode token: the filled prefix only, every position of it visible
                k, v = k[:, :, : int(input_pos[-1]) + 1], v[:, :, : int(input_pos[-1]) + 1]
        if isinstance(mask, BlockMask):
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=self.n_query_groups != self.n_head)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))
        if self.n_query_groups != self.n_head:
            # each key/value head serves n_head // n_query_groups consecutive query heads
            rep = self.n_head // self.n_query_groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if isinstance(mask, ChunkedMask):
            y = mask.attend(q, k, v)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # training without document masks (flash kernels on GPU), or one decode token over its prefix
            y = F.scaled_dot_product_attention(q, k, v, is_causal=input_pos is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.fused: torch.Tensor | None = None  # gate and up weights stacked while `fused_projections` is on

    def fuse(self, on: bool) -> None:
        self.fused = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach() if on else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            gate, up = F.linear(x, self.fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 for stability under bf16."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)  # one op, not five: decoding is op-bound
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer key/value cache [B, n_query_groups, max_seq_length, head_size]."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, ng, T, hs] at positions `input_pos` [T]; return the whole cache."""
        B = k.shape[0]
        self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:B], self.v[:B]


def rope_cache(pos: torch.Tensor, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_size] for positions `pos` [T]; frequencies repeated over both halves (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size))
    freqs = pos.float()[:, None] * inv_freq[None, :]  # [T, hs/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, T, hs] by position: x * cos + rotate_half(x) * sin, with rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA's additive float mask (0 where allowed, -inf elsewhere), converted once per forward
    instead of by SDPA in every layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class ChunkedMask:
    """Document-causal attention as SDPA over query chunks: chunk [q0, q1) attends keys [k0, q1) only, k0 the earliest
    start (over the batch) of a document its queries are in, with an additive mask of that block. The keys before k0
    and after q1 are masked for every query of the chunk, so their blocks are never computed: with several documents
    per window that is less work than the causal square's half, and about that half with one document."""

    def __init__(self, doc_ids: torch.Tensor, chunk: int, dtype: torch.dtype) -> None:
        B, T = doc_ids.shape
        pos = torch.arange(T, device=doc_ids.device)
        new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        # start[b, t]: the first position of t's document in row b (documents are contiguous in a packed window)
        start = torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(dim=1).values
        self.blocks: list[tuple[int, int, int, torch.Tensor]] = []
        for q0 in range(0, T, chunk):
            q1 = min(q0 + chunk, T)
            k0 = int(start[:, q0].min())
            q, k = pos[q0:q1, None], pos[None, k0:q1]
            allowed = (q >= k) & (doc_ids[:, q0:q1, None] == doc_ids[:, None, k0:q1])  # [B, q1 - q0, q1 - k0]
            self.blocks.append((q0, q1, k0, additive(allowed[:, None], dtype)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, nh, T, hs] outputs of q/k/v [B, nh, T, hs]."""
        parts = [
            F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=mask)
            for q0, q1, k0, mask in self.blocks
        ]
        return torch.cat(parts, dim=2)


def document_mask(
    doc_ids: torch.Tensor, kind: str, dtype: torch.dtype, chunk: int = 256
) -> torch.Tensor | BlockMask | ChunkedMask:
    """Causal attention within each document packed into a window, doc_ids [B, T]: flex attention's `BlockMask`
    (fully masked blocks are skipped), SDPA over query chunks (`chunked`) or SDPA's additive [B, 1, T, T] mask
    (`dense`)."""
    B, T = doc_ids.shape
    if kind == "chunked":
        return ChunkedMask(doc_ids, chunk, dtype)
    if kind == "flex":

        def same_document(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        return create_block_mask(same_document, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
    return additive(allowed[:, None], dtype)


@functools.cache
def compiled_flex_attention():
    """flex_attention through torch.compile (its fused kernel; eager flex attention is a slow reference)."""
    return torch.compile(flex_attention, dynamic=False)
