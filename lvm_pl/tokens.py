"""The token layout: the one place that knows codebook ids, special ids and tokens per image.

Ids `0 .. codebook_size-1` are codebook entries. A block of `num_special` ids follows the codebook; BOS and EOS are
its first two (BOS = codebook_size, EOS = codebook_size + 1). The LVM vocabulary is codebook + specials, so an
8192-code tokenizer gives 8192 + 100 = 8292, as in the released LVM checkpoint. A visual sentence of N images is
`[BOS] img_1 ... img_N [EOS]`, each image contributing `tokens_per_image` ids in raster order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lvm_pl.console import UserError


@dataclass(frozen=True)
class TokenLayout:
    """How images become a flat token stream. Build with `TokenLayout.for_images(...)` or from a manifest dict."""

    codebook_size: int
    tokens_per_image: int
    num_special: int = 100
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.codebook_size < 2 or self.tokens_per_image < 1:
            raise UserError(
                f"token layout: bad codebook_size={self.codebook_size} or tokens_per_image={self.tokens_per_image}"
            )
        if self.num_special < 2:
            raise UserError(f"token layout: num_special={self.num_special} must be >= 2 (BOS and EOS)")

    @classmethod
    def for_images(cls, codebook_size: int, image_size: int, downsample: int, **kwargs) -> TokenLayout:
        """Layout for square `image_size` images through a tokenizer with downsampling factor `downsample`."""
        if image_size % downsample:
            raise UserError(f"image_size={image_size} is not a multiple of the tokenizer's downsampling {downsample}")
        return cls(codebook_size=codebook_size, tokens_per_image=(image_size // downsample) ** 2, **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> TokenLayout:
        """Inverse of `to_dict` (ignores unknown keys, so manifests may carry more)."""
        names = {"codebook_size", "tokens_per_image", "num_special", "add_bos", "add_eos"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """Plain dict with the derived ids too, for manifests and checkpoints."""
        return {**asdict(self), "bos_id": self.bos_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size}

    @property
    def bos_id(self) -> int:
        return self.codebook_size

    @property
    def eos_id(self) -> int:
        return self.codebook_size + 1

    @property
    def pad_id(self) -> int:
        """Filler of padded windows: EOS, or without BOS and EOS the first special id (the released LVM's 8192)."""
        return self.eos_id if self.add_bos or self.add_eos else self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_special

    @property
    def storage_dtype(self) -> np.dtype:
        """uint16 when every id fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.int32)

    def sentence_length(self, num_images: int) -> int:
        """Number of tokens of a sentence of `num_images` images, specials included."""
        return int(self.add_bos) + num_images * self.tokens_per_image + int(self.add_eos)

    def num_images(self, sentence_length: int) -> int:
        """Inverse of `sentence_length`: the images of a sentence that many tokens long."""
        body = sentence_length - int(self.add_bos) - int(self.add_eos)
        if body < 0 or body % self.tokens_per_image:
            raise ValueError(f"a sentence of {sentence_length} tokens is not whole images of {self.tokens_per_image}")
        return body // self.tokens_per_image

    def find_sentences(self, tokens: torch.Tensor) -> list[tuple[int, int]]:
        """(start, num_images) of each whole sentence in a row of tokens [L], found by its BOS and EOS (a sentence cut
        by the row's ends is left out). Without BOS or EOS in the layout, sentences cannot be told from the tokens."""
        if not (self.add_bos and self.add_eos):
            raise UserError(f"token layout {self}: sentences are found by BOS and EOS, and this layout lacks one")
        bos = (tokens == self.bos_id).nonzero().flatten().tolist()
        eos = (tokens == self.eos_id).nonzero().flatten().tolist()
        out = []
        for start in bos:
            end = next((p for p in eos if p > start), None)  # the sentence is tokens[start : end + 1]
            if end is not None:
                out.append((start, self.num_images(end + 1 - start)))
        return out

    def frames_that_fit(self, block_size: int, with_eos: bool = False) -> int:
        """The most whole frames of one sentence a model of context `block_size` sees: its last token is predicted,
        never fed, so BOS + n * tokens_per_image - 1 <= block_size (4096 / 256: 16 frames, 15 of them a prompt).
        `with_eos`: the sentence's EOS must be predicted too (training on whole sentences)."""
        fed = block_size + 1 - int(self.add_bos) - int(self.add_eos and with_eos)
        return max(fed // self.tokens_per_image, 0)

    def image_start(self, index: int) -> int:
        """Offset of image `index`'s first token inside its sentence."""
        return int(self.add_bos) + index * self.tokens_per_image

    def sentence(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[N, tokens_per_image] (or [N, h, w]) codebook ids -> [sentence_length(N)] with BOS/EOS added."""
        flat = image_tokens.reshape(image_tokens.shape[0], -1)
        if flat.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected {self.tokens_per_image} tokens per image, got {flat.shape[1]}")
        parts = [flat.reshape(-1).long()]
        if self.add_bos:
            parts.insert(0, torch.tensor([self.bos_id], device=flat.device))
        if self.add_eos:
            parts.append(torch.tensor([self.eos_id], device=flat.device))
        return torch.cat(parts)

    def images(self, sentence: torch.Tensor) -> torch.Tensor:
        """Inverse of `sentence`: [L] -> [N, tokens_per_image] codebook ids (specials stripped)."""
        body = sentence[int(self.add_bos) : len(sentence) - int(self.add_eos)]
        if len(body) % self.tokens_per_image:
            raise ValueError(f"sentence body of {len(body)} tokens is not whole images of {self.tokens_per_image}")
        return body.reshape(-1, self.tokens_per_image)

    def is_codebook(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of ids that are codebook entries."""
        return (ids >= 0) & (ids < self.codebook_size)

    def check_compatible(self, vocab_size: int, where: str) -> None:
        """Raise a clear error when a model's vocabulary cannot hold this layout."""
        if vocab_size != self.vocab_size:
            raise UserError(
                f"{where}: token layout needs vocabulary {self.vocab_size} (codebook {self.codebook_size}"
                f" + {self.num_special} special ids) but the model has {vocab_size}"
            )


def resolve_layout(sources: dict[str, TokenLayout | None], images: dict[str, TokenLayout | None]) -> TokenLayout:
    """The one token layout every source agrees on: the handshake between checkpoint, data and tokenizer.

    `sources` (named, e.g. "the checkpoint", "the shards data/tokens/train/manifest.json") vouch for the whole layout;
    `images` sources (a tokenizer at an image size) only for codebook_size and tokens_per_image. Raises one line
    naming the two that disagree; with only image sources, their layout with the default specials."""
    given = {name: layout for name, layout in sources.items() if layout is not None}
    partial = {name: layout for name, layout in images.items() if layout is not None}
    if not given and not partial:
        raise UserError(
            "model: no token layout: train on token shards (datamodules.tokens.TokenDataModule), set model.tokenizer"
            " with image data, or load an LVM checkpoint"
        )
    (first_name, first), *rest = [*given.items(), *partial.items()]
    for name, layout in rest:
        full = name in given
        same = layout == first if full else _image_fields(layout) == _image_fields(first)
        if not same:
            mine = layout.to_dict() if full else _image_fields(layout)
            theirs = first.to_dict() if full else _image_fields(first)
            raise UserError(f"token layouts disagree: {first_name} has {theirs}, {name} has {mine}")
    return first


def _image_fields(layout: TokenLayout) -> dict:
    return {"codebook_size": layout.codebook_size, "tokens_per_image": layout.tokens_per_image}
