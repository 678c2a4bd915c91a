"""Hugging Face Llama export/import: logits parity both ways, layout round trip, errors, weights-only init."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_checkpoint

from lvm_pl.console import UserError
from lvm_pl.interop.hf_llama import export_hf, import_hf
from lvm_pl.lvm.module import LVM
from lvm_pl.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=40, tokens_per_image=4, num_special=6)
SHAPE = dict(n_embd=32, n_layer=2, n_head=4, n_query_groups=2, intermediate_size=64, block_size=64, rope_base=500.0)


@pytest.fixture
def lvm_checkpoint(tmp_path):
    """A saved LVM with random weights (GQA, a non-default rope base)."""
    torch.manual_seed(0)
    module = LVM(preset="tiny", overrides=SHAPE, layout=LAYOUT.to_dict())
    module.configure_model()
    return save_checkpoint(module, tmp_path / "lvm.ckpt"), module.eval()


def test_export_gives_a_llama_with_equal_logits(tmp_path, lvm_checkpoint):
    from transformers import LlamaForCausalLM

    ckpt, ours = lvm_checkpoint
    export_hf(str(ckpt), str(tmp_path / "hf"))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no temporary directory left
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (40, 41, 46)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    idx = torch.randint(0, 46, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="not empty"):
        export_hf(str(ckpt), str(tmp_path / "hf"))


def test_import_of_an_hf_llama_gives_equal_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=46,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="codebook_size and tokens_per_image"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "x.ckpt"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "lvm.ckpt"), codebook_size=40, tokens_per_image=4)
    ours = LVM.load_from_checkpoint(tmp_path / "lvm.ckpt").eval()
    # an outside Llama gets the released LVM's conventions: no BOS, no EOS
    assert ours.layout == TokenLayout(40, 4, 6, add_bos=False, add_eos=False)
    assert ours.config.n_query_groups == 1 and ours.config.rope_base == 2000.0
    idx = torch.randint(0, 46, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_round_trip_keeps_weights_and_layout(tmp_path, lvm_checkpoint):
    ckpt, ours = lvm_checkpoint
    export_hf(str(ckpt), str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back.ckpt"))  # layout from config.json's lvm_layout
    back = LVM.load_from_checkpoint(tmp_path / "back.ckpt")
    assert back.layout == LAYOUT
    for (k, a), (_, b) in zip(ours.model.state_dict().items(), back.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_import_rejects_what_the_decoder_cannot_hold(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        attention_bias=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="attention_bias=True"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "x.ckpt"), codebook_size=40, tokens_per_image=4)
    with pytest.raises(UserError, match="no config.json"):
        import_hf(str(tmp_path), str(tmp_path / "x.ckpt"))


def test_imported_checkpoint_initialises_a_fit(tmp_path, lvm_checkpoint):
    """`--model.init_from imported.ckpt`: weights and layout from the checkpoint, fresh optimizer and loops."""
    ckpt, ours = lvm_checkpoint
    export_hf(str(ckpt), str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "imported.ckpt"))
    module = LVM(preset="tiny", overrides=SHAPE, init_from=str(tmp_path / "imported.ckpt"))
    module.configure_model()
    assert module.layout == LAYOUT and module.hparams.init_from is None
    idx = torch.randint(0, 46, (1, 9))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(idx), ours(idx))
    wrong = LVM(preset="tiny", init_from=str(tmp_path / "imported.ckpt"))
    with pytest.raises(UserError, match="weights do not fit"):
        wrong.configure_model()


def test_imported_checkpoint_validates_through_the_cli(tmp_path, lvm_checkpoint, repo_root):
    """`validate --ckpt_path imported.ckpt`: the CLI takes the model's shape and layout from the checkpoint's
    hyper-parameters (the YAML says only `tiny`) and loads the imported weights."""
    import numpy as np

    from lvm_pl import shards
    from main import cli

    ckpt, _ = lvm_checkpoint
    export_hf(str(ckpt), str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "imported.ckpt"))
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, LAYOUT.codebook_size, size=(2, LAYOUT.tokens_per_image)) for _ in range(4)]
    shards.write_split(tmp_path / "val", "val", LAYOUT, sentences)
    run = cli(
        [
            "validate",
            "-c",
            str(repo_root / "configs/lvm/tiny.yaml"),
            "--data.train=null",
            f"--data.val={tmp_path / 'val'}",
            "--data.seq_len=10",
            f"--ckpt_path={tmp_path / 'imported.ckpt'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    imported = torch.load(tmp_path / "imported.ckpt", weights_only=True)["state_dict"]
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, imported[k]), k
    assert "val/loss" in run.trainer.callback_metrics
