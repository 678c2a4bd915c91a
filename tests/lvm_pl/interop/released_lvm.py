"""The released LVM's formats, rebuilt small for tests: open-muse's `VQGANModel` (the official repository's
`vqvae_muse.py`, written here from the published architecture), its amused/diffusers `VQModel` export, and a
transformers `LlamaForCausalLM` saved as releases are (bf16, sharded safetensors and sharded `.bin` with rotary
`inv_freq` buffers, config.json with LLaMA's bos/eos 1/2 and no rope_theta)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MUSE_CONFIG = {
    "_class_name": "VQGANModel",
    "resolution": 16,
    "num_channels": 3,
    "hidden_channels": 32,
    "channel_mult": [1, 1, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [4],
    "no_attn_mid_block": False,
    "z_channels": 8,
    "num_embeddings": 64,
    "quantized_embed_dim": 8,
    "dropout": 0.0,
    "resample_with_conv": True,
    "commitment_cost": 0.25,
}
CODES, SPECIAL, TOKENS_PER_IMAGE = 64, 100, 16  # 16 px images, f = 4: 4 x 4 tokens


class MuseResnet(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class MuseAttn(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
        attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)  # [b, hw, hw]
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class MuseLevel(nn.Module):
    """One level of `down` (num_res_blocks resnets) or `up` (num_res_blocks + 1); attention after each resnet when
    the level has more than one (open-muse's `len(self.attn) > 1`)."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(MuseResnet(cin if i == 0 else cout, cout) for i in range(n))
        self.attn = nn.ModuleList(MuseAttn(cout) for _ in range(n)) if attn else nn.ModuleList()
        if resample == "down":
            self.downsample = nn.Module()
            self.downsample.conv = nn.Conv2d(cout, cout, 3, stride=2)
        if resample == "up":
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 1:
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample.conv(F.pad(x, (0, 1, 0, 1)))
        if hasattr(self, "upsample"):
            x = self.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class MuseMid(nn.Module):
    def __init__(self, c: int, attn: bool):
        super().__init__()
        self.block_1, self.block_2 = MuseResnet(c, c), MuseResnet(c, c)
        if attn:
            self.attn_1 = MuseAttn(c)

    def forward(self, x):
        x = self.block_1(x)
        return self.block_2(self.attn_1(x) if hasattr(self, "attn_1") else x)


class MuseVQGAN(nn.Module):
    """open-muse `VQGANModel`: `get_code(pixels in [0, 1]) -> [B, hw]`, `decode_code(ids [B, hw]) -> pixels`."""

    def __init__(self, cfg: dict):
        super().__init__()
        hidden, mult, n = cfg["hidden_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
        levels, res = len(mult), [cfg["resolution"] // 2**i for i in range(len(mult))]
        attn = [r in cfg["attn_resolutions"] for r in res]
        ins = [hidden] + [hidden * m for m in mult[:-1]]
        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, hidden, 3, padding=1)
        self.encoder.down = nn.ModuleList(
            MuseLevel(ins[i], hidden * mult[i], n, attn[i], "down" if i < levels - 1 else None) for i in range(levels)
        )
        top = hidden * mult[-1]
        self.encoder.mid = MuseMid(top, not cfg["no_attn_mid_block"])
        self.encoder.norm_out = nn.GroupNorm(32, top, eps=1e-6)
        self.encoder.conv_out = nn.Conv2d(top, cfg["z_channels"], 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(cfg["z_channels"], top, 3, padding=1)
        self.decoder.mid = MuseMid(top, not cfg["no_attn_mid_block"])
        up_in = [hidden * mult[min(i + 1, levels - 1)] for i in range(levels)]
        self.decoder.up = nn.ModuleList(
            MuseLevel(up_in[i], hidden * mult[i], n + 1, attn[i], "up" if i > 0 else None) for i in range(levels)
        )
        self.decoder.norm_out = nn.GroupNorm(32, hidden * mult[0], eps=1e-6)
        self.decoder.conv_out = nn.Conv2d(hidden * mult[0], 3, 3, padding=1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg["num_embeddings"], cfg["quantized_embed_dim"])
        self.quant_conv = nn.Conv2d(cfg["z_channels"], cfg["quantized_embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(cfg["quantized_embed_dim"], cfg["z_channels"], 1)

    def latents(self, pixels):
        e = self.encoder
        x = e.conv_in(pixels)
        for level in e.down:
            x = level(x)
        return self.quant_conv(e.conv_out(F.silu(e.norm_out(e.mid(x)))))

    def get_code(self, pixels):
        z = self.latents(pixels).permute(0, 2, 3, 1).reshape(-1, self.quantize.embedding.weight.shape[1])
        w = self.quantize.embedding.weight
        d = z.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)[None] - 2 * z @ w.t()
        return d.argmin(1).reshape(pixels.shape[0], -1)

    def decode_code(self, ids):
        b, n = ids.shape
        side = int(n**0.5)
        z = self.quantize.embedding(ids).reshape(b, side, side, -1).permute(0, 3, 1, 2)
        d = self.decoder
        x = d.mid(d.conv_in(self.post_quant_conv(z)))
        for level in reversed(d.up):
            x = level(x)
        return d.conv_out(F.silu(d.norm_out(x)))


def muse_model(seed: int = 0) -> MuseVQGAN:
    """Random weights, rounded to bf16 (so every saved dtype holds them exactly), codebook spread over the encoder's
    outputs (so random images take many codes)."""
    torch.manual_seed(seed)
    model = MuseVQGAN(MUSE_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # GroupNorm affines away from 1/0, so a mix-up shows
        z = model.latents(torch.rand(4, 3, 16, 16)).permute(0, 2, 3, 1).reshape(-1, 8)
        model.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:CODES]])
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def save_muse(model: MuseVQGAN, path: Path) -> None:
    """As open-muse's `save_pretrained` writes it: config.json + a bf16 `pytorch_model.bin`."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(MUSE_CONFIG))
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")


def to_vqmodel(model: MuseVQGAN):
    """diffusers' `VQModel` holding the same weights, renamed as diffusers' scripts/convert_amused.py does."""
    from diffusers import VQModel

    levels = len(MUSE_CONFIG["channel_mult"])
    ref = VQModel(
        block_out_channels=[32, 32, 64],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        layers_per_block=2,
        latent_channels=8,
        vq_embed_dim=8,
        num_vq_embeddings=CODES,
        norm_num_groups=32,
        mid_block_add_attention=True,
        lookup_from_codebook=True,
    )
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    state = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[1] in ("down", "up"):
            level = int(parts[2]) if parts[1] == "down" else levels - 1 - int(parts[2])
            prefix = f"{parts[0]}.{parts[1]}_blocks.{level}"
            if parts[3] == "block":
                layer = "conv_shortcut" if parts[5] == "nin_shortcut" else parts[5]
                name = f"{prefix}.resnets.{parts[4]}.{layer}.{parts[6]}"
            elif parts[3] == "attn":
                name = f"{prefix}.attentions.{parts[4]}.{attention[parts[5]]}.{parts[6]}"
            else:
                name = f"{prefix}.{parts[3]}rs.0.conv.{parts[5]}"
        elif parts[1] == "mid":
            if parts[2] == "attn_1":
                name = f"{parts[0]}.mid_block.attentions.0.{attention[parts[3]]}.{parts[4]}"
            else:
                name = f"{parts[0]}.mid_block.resnets.{int(parts[2][-1]) - 1}.{parts[3]}.{parts[4]}"
        elif parts[1] == "norm_out":
            name = f"{parts[0]}.conv_norm_out.{parts[2]}"
        if ".attentions." in name and "group_norm" not in name and t.dim() == 4:
            t = t[:, :, 0, 0]
        state[name] = t
    ref.load_state_dict(state)
    return ref.eval()


def llama(block_size: int, seed: int = 0):
    """A small LlamaForCausalLM over the released vocabulary shape (codebook + 100 specials), bf16-rounded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=CODES + SPECIAL,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=block_size,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _released_config(path: Path) -> None:
    """config.json as a transformers 4.x conversion wrote it: bf16, LLaMA's bos/eos 1/2, no rope settings."""
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "rope_theta", "rope_scaling", "lvm_layout"):
        cfg.pop(key, None)
    cfg |= {"torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.2"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def save_llama_safetensors(model, path: Path) -> None:
    """Sharded bf16 safetensors (model-0000i-of-0000n.safetensors + model.safetensors.index.json)."""
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    model.float()
    assert (path / "model.safetensors.index.json").is_file()
    _released_config(path)


def save_llama_bin(model, path: Path, shards: int = 3) -> None:
    """Sharded bf16 `pytorch_model-0000i-of-0000n.bin` with the per-layer `rotary_emb.inv_freq` buffers 4.x saved."""
    model.config.save_pretrained(path)
    _released_config(path)
    state = {k: v.bfloat16() for k, v in model.state_dict().items()}
    head = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head, 2).float() / head))
    for i in range(model.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    names, weight_map = sorted(state), {}
    for s in range(shards):
        file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[s::shards]}
        torch.save(part, path / file)
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
