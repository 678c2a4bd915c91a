"""The LLaMA decoder's configuration: one typed dataclass and the named presets of the released LVM models."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lvm_pl.console import UserError

# The released LVM configurations (hidden / layers / heads / MLP width); vocabulary 8192 codes + 100 specials.
# `tiny` is for CPU tests and laptop runs; its vocabulary is normally replaced by the tokenizer's layout.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=128, n_layer=4, n_head=4, intermediate_size=344, vocab_size=8292, block_size=1024),
    "100m": dict(n_embd=640, n_layer=22, n_head=10, intermediate_size=1664),
    "300m": dict(n_embd=1024, n_layer=22, n_head=8, intermediate_size=2688),
    "600m": dict(n_embd=1536, n_layer=22, n_head=16, intermediate_size=4096),
    "1b": dict(n_embd=2048, n_layer=22, n_head=16, intermediate_size=5504),
    "3b": dict(n_embd=3200, n_layer=26, n_head=32, intermediate_size=8640),
    "7b": dict(n_embd=4096, n_layer=32, n_head=32, intermediate_size=11008),
}


@dataclass
class LVMConfig:
    """Shape of the decoder. `n_query_groups < n_head` gives grouped-query attention; derived fields in post-init."""

    name: str = "custom"
    vocab_size: int = 8292
    block_size: int = 4096
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_query_groups: int | None = None
    intermediate_size: int = 344
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02
    # packed documents: true = causal within each document (flex attention on CUDA, `chunked` SDPA on CPU),
    # "flex" / "chunked" / "dense" force one, false = plain causal across documents (the official recipe; flash kernels)
    doc_mask: bool | str = True
    attention_chunk: int = 256  # queries per SDPA call of the `chunked` document mask (docs/benchmarks.md)

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_embd % self.n_head:
            raise UserError(f"lvm config: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            raise UserError(
                f"lvm config: n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}"
            )
        if self.doc_mask not in (True, False, "flex", "chunked", "dense"):
            raise UserError(f"lvm config: doc_mask={self.doc_mask!r}; choose true, false, 'flex', 'chunked' or 'dense'")
        if self.attention_chunk < 1:
            raise UserError(f"lvm config: attention_chunk={self.attention_chunk} must be >= 1")
        if self.head_size % 2:
            raise UserError(f"lvm config: head size {self.head_size} must be even for rotary embeddings")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LVMConfig:
        """A named preset (see `PRESETS`) with `overrides` applied."""
        if name not in PRESETS:
            raise UserError(f"lvm config: unknown preset name={name!r}; choose one of {sorted(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for hyper-parameters and checkpoints)."""
        return asdict(self)
