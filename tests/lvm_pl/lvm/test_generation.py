"""KV-cache generation: greedy equals the full-forward argmax, cache equals no-cache draws, codebook ids only, whole
frames in the sliding window, candidates and batches, `predict_batch` with a fake tokenizer."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers import GreyTokenizer
from torch import nn

from datamodules.prompts import collate_prompts
from lvm_pl.batches import Generated, PromptBatch
from lvm_pl.console import UserError
from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.generation import (
    GenerationSettings,
    generate,
    generate_no_cache,
    predict_batch,
    window_frames,
    with_bos,
)
from lvm_pl.lvm.model import LLaMA
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=16, tokens_per_image=4, num_special=4)  # vocabulary 20, BOS 16, EOS 17


def tiny_model(block_size: int = 64, seed: int = 0, **overrides) -> LLaMA:
    torch.manual_seed(seed)
    config = LVMConfig(
        vocab_size=LAYOUT.vocab_size, block_size=block_size, n_embd=32, n_layer=2, n_head=4, intermediate_size=64
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    model = LLaMA(config).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)  # peaked logits: argmax is never a near-tie
    return model


def prompts(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, LAYOUT.codebook_size, (batch, frames, LAYOUT.tokens_per_image), generator=_g(seed))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def argmax_reference(model: LLaMA, prompt: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Step by step: full forward over [BOS] prompt generated-so-far, argmax over codebook ids."""
    stream = with_bos(prompt, LAYOUT)
    for _ in range(num_frames * LAYOUT.tokens_per_image):
        with torch.no_grad():
            nxt = model(stream)[:, -1, : LAYOUT.codebook_size].argmax(-1)
        stream = torch.cat([stream, nxt[:, None]], dim=1)
    return stream[:, -num_frames * LAYOUT.tokens_per_image :].view(prompt.shape[0], num_frames, -1)


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_greedy_equals_step_by_step_argmax_of_the_full_forward(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    prompt = prompts(3, 2)
    ours = generate(model, prompt, 3, LAYOUT, GenerationSettings(temperature=0))
    assert ours.shape == (3, 3, LAYOUT.tokens_per_image)
    assert torch.equal(ours, argmax_reference(model, prompt, 3))


def test_cached_and_uncached_loops_draw_the_same_tokens_from_one_seed():
    model = tiny_model(block_size=21)  # window: (21 - 1) // 4 - 1 = 4 frames, so 4 + 3 frames slide twice
    settings = GenerationSettings(temperature=1.0, top_k=8, top_p=0.95)
    prompt = prompts(2, 4)
    cached = generate(model, prompt, 3, LAYOUT, settings, _g(7))
    uncached = generate_no_cache(model, prompt, 3, LAYOUT, settings, _g(7))
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, generate(model, prompt, 3, LAYOUT, settings, _g(8)))


def test_no_special_id_inside_a_generated_image_even_when_the_model_prefers_them():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[LAYOUT.codebook_size :] *= 50  # specials dominate every row of logits
        logits = model(with_bos(prompts(2, 1), LAYOUT))[:, -1]
    assert (logits.argmax(-1) >= LAYOUT.codebook_size).all()  # the unfiltered model would emit specials
    for settings in (GenerationSettings(temperature=0), GenerationSettings(temperature=1.5, top_p=0.99)):
        out = generate(model, prompts(2, 1), 2, LAYOUT, settings, _g(0))
        assert out.shape == (2, 2, LAYOUT.tokens_per_image)
        assert LAYOUT.is_codebook(out).all()


class PrefillSpy:
    """Records the token streams of every multi-token (prefill) forward of a model."""

    def __init__(self, model: LLaMA) -> None:
        self.prefills: list[torch.Tensor] = []
        self.model, self.forward = model, model.forward
        model.forward = self

    def __call__(self, idx, input_pos=None, doc_ids=None, last_only=False):
        if idx.shape[1] > 1 and input_pos is not None:
            self.prefills.append(idx.clone())
            assert torch.equal(input_pos, torch.arange(idx.shape[1]))  # positions restart with the window
            assert last_only  # a prefill computes the head at its last position only
        return self.forward(idx, input_pos=input_pos, doc_ids=doc_ids, last_only=last_only)


@pytest.mark.filterwarnings("ignore:.*keeps its last")
@pytest.mark.parametrize(
    # block 20 = [BOS] + 4 frames + the generated frame's first 3 tokens (its last is never fed): window 4
    "block_size,max_context_frames,window,prefills",
    [(20, None, 4, 3), (21, None, 4, 3), (64, 2, 2, 4), (64, 15, 15, 1), (63, None, 14, 1)],
)
def test_sliding_window_keeps_the_most_recent_whole_frames(block_size, max_context_frames, window, prefills):
    model = tiny_model(block_size=block_size)
    settings = GenerationSettings(temperature=0, max_context_frames=max_context_frames)
    assert window_frames(LAYOUT, block_size, max_context_frames) == window
    prompt = prompts(2, 3)
    spy = PrefillSpy(model)
    with pytest.warns(UserWarning, match="keeps its last") if prompt.shape[1] > window else nullcontext():
        out = generate(model, prompt, 4, LAYOUT, settings)
    every = torch.cat([prompt, out], dim=1)  # [B, 7, tpi]
    tpi = LAYOUT.tokens_per_image
    ends = []
    for stream in spy.prefills:
        assert (stream[:, 0] == LAYOUT.bos_id).all() and LAYOUT.is_codebook(stream[:, 1:]).all()
        assert (stream.shape[1] - 1) % tpi == 0  # whole frames only
        frames = stream[:, 1:].view(2, -1, tpi)
        # the window's frames are consecutive frames of prompt + generation, the newest ones available
        k = frames.shape[1]
        end = next(e for e in range(k, every.shape[1] + 1) if torch.equal(every[:, e - k : e], frames))
        ends.append(end)
        assert frames.shape[1] == min(window, end)
    # 3 prompt + 4 generated frames: one prefill, then one more each time the window is full
    assert len(spy.prefills) == prefills and ends == sorted(ends)
    assert torch.equal(out, generate_no_cache(model, prompt, 4, LAYOUT, settings))


def test_window_frames_rejects_a_context_that_cannot_hold_two_images():
    assert window_frames(LAYOUT, 8) == 1  # [BOS] + one frame + 3 tokens of the generated one
    with pytest.raises(UserError, match="block_size=7"):
        window_frames(LAYOUT, 7)


def test_a_batch_row_generates_as_it_does_alone():
    model = tiny_model()
    prompt = prompts(3, 2)
    settings = GenerationSettings(temperature=0)
    batched = generate(model, prompt, 2, LAYOUT, settings)
    alone = generate(model, prompt[1:2], 2, LAYOUT, settings)
    assert torch.equal(batched[1:2], alone)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="num_candidates"):
        GenerationSettings(num_candidates=0)
    with pytest.raises(UserError, match="max_context_frames"):
        GenerationSettings(max_context_frames=0)
    with pytest.raises(UserError, match="top_p"):
        GenerationSettings(top_p=0.0)


def prompt_batch(prompts: list[torch.Tensor], num_frames: list[int], kinds: list[str]) -> PromptBatch:
    """Prompt stacks [n_i, 3, H, W] -> the `PromptBatch` PromptDataModule's loader gives (no ground truth)."""
    items = [
        {"prompt": p, "truth": None, "num_frames": f, "kind": k, "name": f"p{i}", "index": i}
        for i, (p, f, k) in enumerate(zip(prompts, num_frames, kinds, strict=True))
    ]
    return collate_prompts(items)


def test_predict_batch_groups_prompts_and_returns_candidates_and_images():
    model, tokenizer = tiny_model(), GreyTokenizer(LAYOUT.codebook_size)
    images = torch.rand(3, 2, 3, 8, 8) * 2 - 1  # 8x8 pixels -> 2x2 = 4 tokens
    kinds = ["sequence", "category", "analogy"]
    batch = prompt_batch([images[0], images[1, :1], images[2]], [1, 2, 1], kinds)
    assert batch.num_prompt.tolist() == [2, 1, 2]
    settings = GenerationSettings(temperature=1.0, num_candidates=2)
    out = predict_batch(model, tokenizer, LAYOUT, batch, settings)
    assert isinstance(out, Generated) and out.prompts is batch
    assert out.tokens.shape == (3, 2, 2, 4) and out.images.shape == (3, 2, 2, 3, 8, 8)
    assert out.num_tokens == 2 * (1 + 2 + 1) * 4 and out.seconds > 0
    assert out.prompts.kinds == kinds
    assert LAYOUT.is_codebook(out.tokens).all()
    # row 1 (one prompt image, two frames) equals generating it alone under greedy decoding
    greedy = predict_batch(model, tokenizer, LAYOUT, batch, GenerationSettings(temperature=0))
    alone = generate(model, tokenizer.encode(batch.prompt[1, :1]).view(1, 1, 4), 2, LAYOUT, GenerationSettings(0))
    assert torch.equal(greedy.tokens[1, 0], alone[0])
    torch.testing.assert_close(greedy.images[1, 0], tokenizer.decode(alone[0].view(2, 2, 2)))
    # same seed, same draws; two candidates of a sampled prompt differ
    again = predict_batch(model, tokenizer, LAYOUT, batch, settings)
    assert torch.equal(out.tokens, again.tokens)
    assert not torch.equal(out.tokens[:, 0], out.tokens[:, 1])


def test_predict_batch_names_the_image_size_when_the_layout_does_not_match():
    batch = prompt_batch([torch.zeros(1, 3, 16, 16)], [1], ["sequence"])
    with pytest.raises(UserError, match="data.image_size"):
        predict_batch(tiny_model(), GreyTokenizer(16), LAYOUT, batch, GenerationSettings())


@pytest.mark.slow
def test_compiled_decode_step_generates_the_same_tokens():
    model = tiny_model()
    prompt = prompts(2, 2)
    eager = generate(model, prompt, 2, LAYOUT, GenerationSettings(temperature=0))
    compiled = generate(model, prompt, 2, LAYOUT, GenerationSettings(temperature=0, compile=True))
    assert torch.equal(eager, compiled)


@pytest.mark.gpu
def test_cuda_graph_decode_step_and_bf16_cache_on_gpu():
    model = tiny_model().cuda()
    prompt = prompts(2, 2).cuda()
    greedy = GenerationSettings(temperature=0)
    eager = generate(model, prompt, 2, LAYOUT, greedy)
    assert torch.equal(eager, generate(model, prompt, 2, LAYOUT, GenerationSettings(temperature=0, compile=True)))
    half = tiny_model().cuda().to(torch.bfloat16)
    out = generate(half, prompt, 2, LAYOUT, GenerationSettings(temperature=1.0, top_p=0.9), torch.Generator("cuda"))
    assert out.shape == (2, 2, LAYOUT.tokens_per_image) and LAYOUT.is_codebook(out).all()


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_fused_projections_give_the_unfused_logits_and_follow_weight_updates(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    idx = with_bos(prompts(2, 3), LAYOUT)
    plain = model(idx)
    with model.fused_projections():
        assert all(b.self_attn.fused is not None and b.mlp.fused is not None for b in model.layers)
        torch.testing.assert_close(model(idx), plain, rtol=1e-5, atol=1e-5)
    assert all(b.self_attn.fused is None and b.mlp.fused is None for b in model.layers)
    settings = GenerationSettings(temperature=0)
    before = generate(model, prompts(2, 2), 2, LAYOUT, settings)
    with torch.no_grad():  # a training step between two calls: the second must see the new weights
        for block in model.layers:
            block.self_attn.v_proj.weight.mul_(-3.0)
            block.mlp.up_proj.weight.mul_(2.0)
    after = generate(model, prompts(2, 2), 2, LAYOUT, settings)
    reference = generate(model, prompts(2, 2), 2, LAYOUT, GenerationSettings(temperature=0, fuse_projections=False))
    assert torch.equal(after, reference) and not torch.equal(before, after)
