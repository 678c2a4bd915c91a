"""Hugging Face Llama interop: lvm-pl checkpoints <-> transformers `LlamaForCausalLM` directories.

Our decoder names its parameters as `LlamaForCausalLM` does (minus the `model.` prefix of the body) and uses the same
rotate-half rotary layout, so both directions are a rename; no q/k permutation is needed. The token layout travels in
config.json as `lvm_layout` (and as bos/eos ids), so an exported model imports back with its vocabulary meaning intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning
import torch

from lvm_pl.atomic import atomic_dir, torch_save
from lvm_pl.checkpoint_io import check_stage
from lvm_pl.console import UserError, say
from lvm_pl.interop.weights import iter_weights, weight_files
from lvm_pl.lvm.config import PRESETS, LVMConfig
from lvm_pl.lvm.module import LVM
from lvm_pl.tokens import TokenLayout

SHAPE_FIELDS = ("n_embd", "n_layer", "n_head", "n_query_groups", "intermediate_size", "block_size", "norm_eps")


def to_hf_name(name: str) -> str:
    """Our decoder's parameter name -> LlamaForCausalLM's."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    """LlamaForCausalLM's parameter name -> our decoder's."""
    return name.removeprefix("model.")


def hf_config(config: LVMConfig, layout: TokenLayout):
    """The `LlamaConfig` of our decoder, with the token layout attached."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        initializer_range=config.init_std,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=layout.bos_id,
        eos_token_id=layout.eos_id,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
        lvm_layout=layout.to_dict(),
    )


def export_hf(checkpoint: str, out_dir: str, dtype: str = "float32") -> None:
    """Write an lvm-pl checkpoint as a transformers LlamaForCausalLM directory (config.json + model.safetensors).

    The directory appears whole or not at all (written in a temporary sibling, then renamed).

    Args:
        checkpoint: the LVM checkpoint to export (from `main.py fit`, `import-hf` or `convert-zero`).
        out_dir: the directory to write (it must not hold another model).
        dtype: the weights' dtype in the export: float32, bfloat16 or float16.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out_dir={out_dir}: exists and is not empty; choose a new directory")
    cast = _torch_dtype(dtype)
    module = _load_lvm(checkpoint)
    state = {to_hf_name(k): v.detach().to(cast).contiguous() for k, v in module.model.state_dict().items()}
    config = hf_config(module.config, module.layout)
    config.torch_dtype = dtype
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    say(f"exported {checkpoint} -> {out_dir} ({sum(v.numel() for v in state.values()):,} parameters, {dtype})")


def import_hf(
    hf_dir: str,
    out: str,
    codebook_size: int | None = None,
    tokens_per_image: int | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
    dtype: str | None = None,
) -> None:
    """Convert a transformers LlamaForCausalLM directory into an lvm-pl checkpoint (`LVM.load_from_checkpoint`-able).

    Weights: `model.safetensors`, `pytorch_model.bin` or their shards (`*.index.json`), read one shard at a time.
    The token layout comes from config.json's `lvm_layout` (our exports); otherwise give it with the arguments below.

    Args:
        hf_dir: the transformers directory (config.json and the weights).
        out: the lvm-pl checkpoint file to write.
        codebook_size: the tokenizer's codebook size (the released LVM: 8192); the other ids are special ones.
        tokens_per_image: tokens of one image (the released LVM: 256, a 16x16 grid).
        add_bos: the sentences start with a BOS id (the released LVM has none; its config's ids 1/2 are LLaMA's).
        add_eos: the sentences end with an EOS id (the released LVM has none).
        dtype: float32, bfloat16 or float16 for the weights; default: the dtype they are stored in.
    """
    path = Path(hf_dir)
    cfg = _read_hf_config(path)
    layout = _hf_layout(cfg, hf_dir, codebook_size, tokens_per_image, add_bos, add_eos)
    config = _lvm_config(cfg, hf_dir)
    cast = _torch_dtype(dtype) if dtype is not None else None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in _model_state_shapes(config).items()}
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in iter_weights(weight_files(path, ("model", "pytorch_model"))):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer transformers 4.x saved; the decoder computes it from rope_base
        key = from_hf_name(name)
        if key not in expected:
            raise UserError(f"{hf_dir}: weight {name} does not fit a Llama of this config.json")
        if tensor.shape != expected[key]:
            raise UserError(
                f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, config.json gives {tuple(expected[key])}"
            )
        weights[key] = tensor if cast is None else tensor.to(cast)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{hf_dir}: weights lack {to_hf_name(missing[0])} (and {len(missing) - 1} more)")
    preset = _matching_preset(config)
    overrides = {f: getattr(config, f) for f in SHAPE_FIELDS} | {"rope_base": config.rope_base}
    # `_class_path` as LightningCLI writes it: `--ckpt_path` then applies these hyper-parameters to the model config
    hparams = {
        "_class_path": f"{LVM.__module__}.{LVM.__qualname__}",
        "preset": preset,
        "overrides": overrides,
        "layout": layout.to_dict(),
    }
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in weights.items()},
        LVM.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
        "pytorch-lightning_version": lightning.__version__,
    }
    torch_save(out, checkpoint)
    kept = next(iter(weights.values())).dtype
    say(
        f"imported {hf_dir} -> {out} (preset {preset}, {kept}, vocabulary {layout.vocab_size}: {layout.codebook_size}"
        f" codes, {layout.tokens_per_image} per image, BOS {'yes' if layout.add_bos else 'no'})"
    )


def _torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={name!r}: not one of float32, bfloat16, float16")
    return getattr(torch, name)


def _load_lvm(checkpoint: str) -> LVM:
    if not Path(checkpoint).is_file():
        raise UserError(f"checkpoint={checkpoint}: no such file")
    check_stage(checkpoint, f"{LVM.__module__}.{LVM.__qualname__}", "export-hf", key="checkpoint")
    module = LVM.load_from_checkpoint(checkpoint, map_location="cpu")  # weights-only, a bad file named
    return module.eval()


def _read_hf_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"hf_dir={path}: no config.json; expected a transformers LlamaForCausalLM directory")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "llama":
        raise UserError(f"{config_file}: model_type={cfg.get('model_type')!r}, expected 'llama'")
    unsupported = {
        "attention_bias": cfg.get("attention_bias", False),
        "mlp_bias": cfg.get("mlp_bias", False),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
    }
    for key, value in unsupported.items():
        if value:
            raise UserError(f"{config_file}: {key}={value} is not supported by the lvm-pl decoder")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{config_file}: hidden_act={cfg['hidden_act']!r}, the lvm-pl decoder uses silu (SwiGLU)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{config_file}: rope scaling {rope} is not supported (plain rotary embeddings only)")
    return cfg


def _hf_layout(
    cfg: dict, hf_dir: str, codebook_size: int | None, tokens_per_image: int | None, add_bos: bool, add_eos: bool
) -> TokenLayout:
    if "lvm_layout" in cfg and codebook_size is None and tokens_per_image is None:
        layout = TokenLayout.from_dict(cfg["lvm_layout"])
    elif codebook_size is None or tokens_per_image is None:
        raise UserError(
            f"{hf_dir}/config.json has no lvm_layout: give codebook_size and tokens_per_image"
            " (the released LVM: 8192 and 256)"
        )
    else:
        num_special = cfg["vocab_size"] - codebook_size
        layout = TokenLayout(codebook_size, tokens_per_image, num_special, add_bos=add_bos, add_eos=add_eos)
    layout.check_compatible(cfg["vocab_size"], f"{hf_dir}/config.json vocab_size")
    return layout


def _lvm_config(cfg: dict, hf_dir: str) -> LVMConfig:
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise UserError(f"{hf_dir}/config.json: head_dim={head_dim} x heads={n_head} != hidden_size={n_embd}")
    rope = cfg.get("rope_parameters") or {}
    return LVMConfig(
        vocab_size=cfg["vocab_size"],
        block_size=cfg.get("max_position_embeddings", 4096),
        n_embd=n_embd,
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_query_groups=cfg.get("num_key_value_heads") or n_head,
        intermediate_size=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
    )


def _model_state_shapes(config: LVMConfig) -> dict[str, torch.Tensor]:
    from lvm_pl.lvm.model import LLaMA

    return LLaMA(config).state_dict()


def _matching_preset(config: LVMConfig) -> str:
    """The preset this shape is (so hparams read naturally), else `tiny` with every shape field overridden."""
    for name in PRESETS:
        candidate = LVMConfig.from_name(name)
        if name != "tiny" and all(getattr(candidate, f) == getattr(config, f) for f in SHAPE_FIELDS):
            return name
    return "tiny"
