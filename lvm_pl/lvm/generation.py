"""Visual prompting: prompt images -> generated image tokens with the decoder's static KV cache, and back to pixels.

A prompt of N images is the token stream `[BOS] img_1 .. img_N` (no EOS). Generation runs one prefill over it, then
one token per step, batched over prompts and candidates, and emits exactly `tokens_per_image` codebook ids per image
(special ids are never sampled). When the context plus the image being generated would not fit the model's
`block_size` (or `max_context_frames` is reached, 15 in the official demo), the context slides: it is rebuilt as
`[BOS]` + the most recent whole frames and prefilled again, positions restarting at 0, as in training.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lvm_pl.batches import Generated, PromptBatch
from lvm_pl.console import UserError, warn
from lvm_pl.lvm.model import LLaMA
from lvm_pl.lvm.sampling import check_sampling, sample
from lvm_pl.tokens import TokenLayout

DecodeStep = Callable[[LLaMA, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerationSettings:
    """How to sample, how many candidates per prompt, how much context to keep, the seed, how to decode.

    Args:
        temperature: softmax temperature of sampling; 0 is greedy.
        top_k: sample among the k most likely tokens only (None: all).
        top_p: sample among the most likely tokens whose probabilities sum to p (None: all).
        num_candidates: samples per prompt (one grid row each).
        max_context_frames: frames of context kept (None: as many as fit the model's block_size).
        seed: the sampling seed (each prompt's generation is reproducible).
        compile: `torch.compile` the one-token decode step (CUDA graphs on GPU).
        fuse_projections: eager decoding stacks the q/k/v and gate/up weights into one matmul each
            (`LLaMA.fused_projections`: faster, about 70% of the weights' memory again while generating).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_candidates: int = 1
    max_context_frames: int | None = None
    seed: int = 0
    compile: bool = False
    fuse_projections: bool = True

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.num_candidates < 1:
            raise UserError(f"generation.num_candidates={self.num_candidates}: must be >= 1")
        if self.max_context_frames is not None and self.max_context_frames < 1:
            raise UserError(f"generation.max_context_frames={self.max_context_frames}: must be >= 1, or null")


def window_frames(layout: TokenLayout, block_size: int, max_context_frames: int | None = None) -> int:
    """Frames of context kept: that many frames and the one being generated fit in `block_size` (its last token is
    never fed: 4096 / 256 keeps 15)."""
    fit = layout.frames_that_fit(block_size) - 1
    if fit < 1:
        raise UserError(
            f"model block_size={block_size} cannot hold one prompt image and one generated image of "
            f"{layout.tokens_per_image} tokens; use a model with a longer context or smaller images"
        )
    return fit if max_context_frames is None else min(fit, max_context_frames)


def with_bos(frames: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Whole frames [B, F, tokens_per_image] -> the prompt stream [B, (1) + F * tokens_per_image]."""
    flat = frames.flatten(1)
    if not layout.add_bos:
        return flat
    return torch.cat([flat.new_full((flat.shape[0], 1), layout.bos_id), flat], dim=1)


def decode_step(model: LLaMA, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One cached step: token [B, 1] at position input_pos [1] -> next-token logits [B, V]."""
    return model(token, input_pos=input_pos)[:, -1]


_compiled: weakref.WeakKeyDictionary[nn.Module, DecodeStep] = weakref.WeakKeyDictionary()


def compiled_decode_step(model: LLaMA) -> DecodeStep:
    """`decode_step` through `torch.compile` (CUDA graphs on GPU), compiled once per model."""
    if model not in _compiled:
        device = model.embed_tokens.weight.device
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[model] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[model]


def _ensure_cache(model: LLaMA, batch_size: int, length: int) -> None:
    """Set up the static cache unless one of at least this batch and exactly this length exists (reuse keeps
    compiled steps' buffers in place; a shorter batch uses the cache's first rows)."""
    if model.has_kv_cache:
        k = model.layers[0].self_attn.kv_cache.k  # [B, ng, S, hs]
        if k.shape[0] >= batch_size and k.shape[2] == length:
            return
    model.setup_kv_cache(batch_size, length)


def _crop_prompt(prompt: torch.Tensor, window: int) -> torch.Tensor:
    if prompt.shape[1] > window:
        n = prompt.shape[1]
        warn(f"generation: prompt of {n} images drops the earliest {n - window}, keeps its last {window} (the context)")
        return prompt[:, -window:]
    return prompt


@torch.no_grad()
def generate(
    model: LLaMA,
    prompt: torch.Tensor,
    num_frames: int,
    layout: TokenLayout,
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt codebook ids [B, N, tokens_per_image] -> `num_frames` generated images [B, num_frames, tokens_per_image].

    One prefill, then one token per cached decode step; the context slides by whole frames when full.
    """
    with model.fused_projections(settings.fuse_projections and not settings.compile):
        return _generate(model, prompt, num_frames, layout, settings, generator)


def _generate(
    model: LLaMA,
    prompt: torch.Tensor,
    num_frames: int,
    layout: TokenLayout,
    settings: GenerationSettings,
    generator: torch.Generator | None,
) -> torch.Tensor:
    tpi = layout.tokens_per_image
    window = window_frames(layout, model.config.block_size, settings.max_context_frames)
    frames = _crop_prompt(prompt, window)
    B, device = frames.shape[0], frames.device
    # eager: the cache holds the longest context this call reaches, as each step attends over the whole cache;
    # compiled: always the full window, so one cache shape (one compiled graph) serves every prompt length
    frames_cached = window + 1 if settings.compile else min(window + 1, frames.shape[1] + num_frames)
    # the last frame's last token is sampled, never fed
    _ensure_cache(model, B, int(layout.add_bos) + frames_cached * tpi - 1)
    step = compiled_decode_step(model) if settings.compile else decode_step
    draw = dict(
        codebook_size=layout.codebook_size,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=generator,
    )
    out = torch.empty(B, num_frames, tpi, dtype=torch.long, device=device)
    context_frames = 0  # whole frames in the cached context
    for f in range(num_frames):
        if f == 0 or context_frames > window:
            context = with_bos(frames[:, -window:], layout)  # [B, L]
            input_pos = torch.arange(context.shape[1], device=device)
            logits = model(context, input_pos=input_pos, last_only=True)[:, -1]  # [B, V]
            input_pos = input_pos[-1:] + 1  # [1]: the next position to write
            context_frames = min(frames.shape[1], window)
        # the last token of this frame is fed only if the next frame continues this context (no slide)
        feed_last = f < num_frames - 1 and context_frames + 1 <= window
        for i in range(tpi):
            token = sample(logits, **draw)  # [B]
            out[:, f, i] = token
            if i < tpi - 1 or feed_last:
                logits = step(model, token[:, None], input_pos)
                input_pos = input_pos + 1
        frames = torch.cat([frames[:, -window:], out[:, f : f + 1]], dim=1)
        context_frames += 1
    return out


@torch.no_grad()
def generate_no_cache(
    model: LLaMA,
    prompt: torch.Tensor,
    num_frames: int,
    layout: TokenLayout,
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference loop for tests and the benchmark: the same windowing and draws as `generate`, but a full forward
    over the whole context for every token (no cache). [B, N, tpi] -> [B, num_frames, tpi]."""
    tpi = layout.tokens_per_image
    window = window_frames(layout, model.config.block_size, settings.max_context_frames)
    frames = _crop_prompt(prompt, window)
    draw = dict(
        codebook_size=layout.codebook_size,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=generator,
    )
    out = torch.empty(frames.shape[0], num_frames, tpi, dtype=torch.long, device=frames.device)
    context_frames = 0
    for f in range(num_frames):
        if f == 0 or context_frames > window:
            context = with_bos(frames[:, -window:], layout)
            context_frames = min(frames.shape[1], window)
        for i in range(tpi):
            stream = torch.cat([context, out[:, f, :i]], dim=1)
            out[:, f, i] = sample(model(stream)[:, -1], **draw)
        context = torch.cat([context, out[:, f]], dim=1)
        frames = torch.cat([frames[:, -window:], out[:, f : f + 1]], dim=1)
        context_frames += 1
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_batch(
    model: LLaMA, tokenizer: nn.Module, layout: TokenLayout, batch: PromptBatch, settings: GenerationSettings
) -> Generated:
    """A prompt batch -> its prompts' generated tokens and decoded images (`settings.num_candidates` each).
    Prompts of equal length and frame count are generated together."""
    prompt, counts, wanted = batch.prompt, batch.num_prompt.tolist(), batch.num_frames.tolist()
    B, N = prompt.shape[:2]
    codes = tokenizer.encode(prompt.flatten(0, 1))  # [B*N, h, w]
    grid = codes.shape[1:]
    if codes[0].numel() != layout.tokens_per_image:
        raise UserError(
            f"prompt images of {tuple(prompt.shape[-2:])} pixels give {codes[0].numel()} tokens but the model's layout"
            f" has {layout.tokens_per_image} per image; set data.image_size to the size the LVM was trained on"
        )
    codes = codes.reshape(B, N, layout.tokens_per_image)
    n, F = settings.num_candidates, max(wanted)
    tokens = codes.new_zeros(B, n, F, layout.tokens_per_image)
    # one generator per batch, seeded by the settings and the batch's first prompt: reruns draw the same images
    first = int(batch.index[0])
    generator = torch.Generator(codes.device).manual_seed(settings.seed * 1_000_003 + first)
    _synchronize(codes.device)
    start = time.perf_counter()
    for key in sorted(set(zip(counts, wanted, strict=True))):
        rows = [b for b in range(B) if (counts[b], wanted[b]) == key]
        group = codes[rows, : key[0]].repeat_interleave(n, dim=0)  # [len(rows) * n, N_k, tpi]
        out = generate(model, group, key[1], layout, settings, generator)
        tokens[rows, :, : key[1]] = out.view(len(rows), n, key[1], -1)
    _synchronize(codes.device)
    seconds = time.perf_counter() - start
    images = tokenizer.decode(tokens.view(-1, *grid))  # [B*n*F, 3, H, W]
    return Generated(
        batch, tokens, images.view(B, n, F, *images.shape[1:]), n * sum(wanted) * layout.tokens_per_image, seconds
    )
