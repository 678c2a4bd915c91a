"""The LLaMA decoder: parity with transformers' LlamaForCausalLM, causality, KV cache, document mask, presets."""

from __future__ import annotations

import pytest
import torch

from lvm_pl.console import UserError
from lvm_pl.lvm.config import PRESETS, LVMConfig
from lvm_pl.lvm.model import LLaMA

SMALL = dict(vocab_size=97, block_size=64, n_embd=32, n_layer=2, n_head=4, intermediate_size=88)


def small_model(**overrides) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LVMConfig(**{**SMALL, **overrides})).eval()


def hf_twin(model: LLaMA):
    """A transformers LlamaForCausalLM with the same configuration and weights (sdpa attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.n_embd,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_query_groups,
            max_position_embeddings=c.block_size,
            rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_base,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    ).eval()
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)
    return hf


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_logits_match_hf_llama(n_query_groups):
    model = small_model(n_query_groups=n_query_groups)
    hf = hf_twin(model)
    idx = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (2, 23, 97)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_later_tokens_never_change_earlier_logits():
    model = small_model()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_kv_cached_prefill_and_decode_equal_full_forward(n_query_groups):
    model = small_model(n_query_groups=n_query_groups)
    idx = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=3, max_seq_length=32)
        steps = [model(idx[:, :9], input_pos=torch.arange(9))]  # prefill
        steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(9, 17)]  # decode one by one
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    model.clear_kv_cache()
    with pytest.raises(ValueError, match="setup_kv_cache"):
        model(idx, input_pos=torch.arange(17))


def test_document_mask_blocks_attention_across_documents():
    model = small_model()
    a, b = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 6))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 8 + [1] * 6])
    other = torch.cat([torch.randint(0, 97, (1, 8)), b], dim=1)  # a different first document
    with torch.no_grad():
        masked, masked_other = model(packed, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
        unmasked, unmasked_other = model(packed), model(other)
        alone = model(a)
    # the second document's logits ignore the first document entirely ...
    torch.testing.assert_close(masked[:, 8:], masked_other[:, 8:])
    # ... without the mask they would not
    assert not torch.allclose(unmasked[:, 8:], unmasked_other[:, 8:])
    # the first document sees exactly what it would see alone, and one document is the plain causal forward
    torch.testing.assert_close(masked[:, :8], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(packed, doc_ids=torch.zeros_like(doc_ids)), unmasked, atol=1e-5, rtol=1e-5)


def packed_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 3 and 2 packed documents of uneven lengths (so flex attention's 128-blocks are partly masked)."""
    torch.manual_seed(1)
    idx = torch.randint(0, 97, (2, 64), device=device)
    starts = torch.tensor([[0, 20, 45], [0, 33, 64]], device=device)
    doc_ids = (torch.arange(64, device=device)[None, :, None] >= starts[:, None, :]).sum(-1) - 1  # [2, 64]
    return idx, doc_ids


def test_flex_document_mask_equals_the_dense_mask():
    dense, flex = small_model(doc_mask="dense"), small_model(doc_mask="flex")
    idx, doc_ids = packed_batch()
    with torch.no_grad():  # CPU flex attention has no backward; the GPU test below trains through it
        torch.testing.assert_close(flex(idx, doc_ids=doc_ids), dense(idx, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 100])
def test_chunked_document_mask_trains_like_the_dense_mask(chunk):
    """Logits and every gradient equal the dense mask's (fp32, 1e-5), for chunks that split documents anywhere."""
    dense = small_model(doc_mask="dense")
    chunked = small_model(doc_mask="chunked", attention_chunk=chunk)
    chunked.load_state_dict(dense.state_dict())
    idx, doc_ids = packed_batch()
    outs = []
    for model in (dense, chunked):
        logits = model(idx, doc_ids=doc_ids)
        logits.logsumexp(-1).mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_chunked_mask_skips_the_keys_before_the_earliest_document():
    from lvm_pl.lvm.model import ChunkedMask

    doc_ids = torch.tensor([[0] * 10 + [1] * 10 + [2] * 12, [0] * 16 + [1] * 16])
    blocks = [(q0, q1, k0) for q0, q1, k0, _ in ChunkedMask(doc_ids, 8, torch.float32).blocks]
    # chunk [24, 32): row 0's queries are in document 2 (from 20), row 1's in document 1 (from 16): keys from 16
    assert blocks == [(0, 8, 0), (8, 16, 0), (16, 24, 10), (24, 32, 16)]


def test_doc_mask_false_is_causal_across_documents():
    idx, doc_ids = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(small_model(doc_mask=False)(idx, doc_ids=doc_ids), small_model()(idx))
    with pytest.raises(UserError, match="doc_mask='sparse'"):
        LVMConfig(**SMALL, doc_mask="sparse")


@pytest.mark.gpu
def test_flex_document_mask_trains_like_the_dense_mask_on_cuda():
    idx, doc_ids = packed_batch("cuda")
    grads = []
    for kind in ("dense", "flex"):
        model = small_model(doc_mask=kind).cuda().train()
        logits = model(idx, doc_ids=doc_ids)
        logits.square().mean().backward()
        grads.append((logits.detach(), model.layers[0].self_attn.q_proj.weight.grad))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model().train()
    idx = torch.randint(0, 97, (2, 10))
    model(idx).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx).sum().backward()
    for g, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


EXPECTED_PARAMS = {
    "100m": 116_974_720,
    "300m": 290_968_576,
    "600m": 648_396_288,
    "1b": 1_147_119_616,
    "3b": 3_274_742_400,
    "7b": 6_544_199_680,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_on_meta_device(name):
    with torch.device("meta"):
        model = LLaMA(LVMConfig.from_name(name))
    c = model.config
    assert (c.vocab_size, c.block_size, c.norm_eps, c.rope_base) == (8292, 4096, 1e-6, 10000.0)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_presets_and_config_errors():
    assert set(PRESETS) == {"tiny", *EXPECTED_PARAMS}
    assert LVMConfig.from_name("tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(UserError, match="name='huge'"):
        LVMConfig.from_name("huge")
    with pytest.raises(UserError, match="n_query_groups=3"):
        LVMConfig(n_embd=32, n_head=4, n_query_groups=3)


def test_init_is_normal_002():
    torch.manual_seed(0)
    model = LLaMA(LVMConfig.from_name("tiny"))
    assert abs(model.lm_head.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


@pytest.mark.gpu
def test_bf16_cuda_cached_decode_and_document_mask_follow_fp32():
    model = small_model().cuda()
    idx = torch.randint(0, 97, (2, 24), device="cuda")
    doc_ids = (torch.arange(24, device="cuda") >= 10).long().expand(2, -1)
    with torch.no_grad():
        reference = model(idx, doc_ids=doc_ids).float()
        model.to(torch.bfloat16)
        masked = model(idx, doc_ids=doc_ids).float()
        model.setup_kv_cache(batch_size=2, max_seq_length=32)
        prefill = model(idx[:, :10], input_pos=torch.arange(10, device="cuda")).float()
    torch.testing.assert_close(masked, reference, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(prefill, reference[:, :10], atol=5e-2, rtol=5e-2)


def test_last_only_is_the_last_position_of_the_full_logits():
    model = small_model()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])
