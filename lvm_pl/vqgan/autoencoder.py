"""Convolutional encoder/decoder laid out like diffusers' `VQModel` (same blocks, order, padding and attribute names).

Keys differ from diffusers only in the quantizer (`quantize.embedding.weight` there), so weights move both ways by
renaming and reproduce diffusers' encode indices and decoded images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv (3x3, or 1x1 in a patch-local encoder), twice, plus a 1x1 shortcut when the channel
    count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6, kernel: int = 3):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel, padding=kernel // 2)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual, as diffusers' `Attention` with `group_norm` (one head)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample2D(nn.Module):
    """Stride-2 conv3x3 after padding right/bottom by one (diffusers' asymmetric `padding=0` variant); `local`: a
    2x2 stride-2 conv without padding, so each output sees exactly its own 2x2 input patch."""

    def __init__(self, channels: int, local: bool = False):
        super().__init__()
        self.local = local
        self.conv = nn.Conv2d(channels, channels, 2 if local else 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.local else F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest upsampling in fp32: bf16 interpolate is unsupported on some backends (diffusers does the same)
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class ResolutionBlock(nn.Module):
    """One resolution level: `num_layers` resnets, each followed by attention if asked."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, attention: bool, kernel: int = 3
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, kernel=kernel)
            for i in range(num_layers)
        )
        if attention:
            self.attentions = nn.ModuleList(Attention(out_channels, groups) for _ in range(num_layers))
        else:
            self.attentions = None

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The resnets (and attentions) of this level, before any resampling."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        return x


class DownBlock(ResolutionBlock):
    """diffusers' `DownEncoderBlock2D` / `AttnDownEncoderBlock2D`: resnets then `downsamplers.0`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        attention: bool,
        down: bool,
        local: bool = False,
    ):
        super().__init__(in_channels, out_channels, num_layers, groups, attention, kernel=1 if local else 3)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, local)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_layers(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(ResolutionBlock):
    """diffusers' `UpDecoderBlock2D` / `AttnUpDecoderBlock2D`: resnets then `upsamplers.0`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, attention: bool, up: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_layers(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """diffusers' `UNetMidBlock2D` without time embedding: resnet, (attention), resnet."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> latents [B, latent, H/f, W/f] with f = 2^(levels-1). `local`: only `conv_in` is 3x3,
    then 1x1 resnets, 2x2 stride-2 downsamples, no mid block and a 1x1 `conv_out`, so a latent sees its own f x f
    patch plus a one-pixel rim (receptive field f + 2 px)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: list[int],
        layers_per_block: int,
        groups: int,
        attention_levels: list[int],
        mid_attention: bool,
        local: bool = False,
    ):
        super().__init__()
        if local and (attention_levels or mid_attention):
            raise ValueError("a patch-local encoder has no attention: attention spans the whole image")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        levels = len(block_out_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                block_out_channels[max(i - 1, 0)],
                ch,
                layers_per_block,
                groups,
                attention=i in attention_levels,
                down=i < levels - 1,
                local=local,
            )
            for i, ch in enumerate(block_out_channels)
        )
        self.mid_block = None if local else MidBlock(block_out_channels[-1], groups, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        kernel = 1 if local else 3
        self.conv_out = nn.Conv2d(block_out_channels[-1], latent_channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        if self.mid_block is not None:
            x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] -> image [B, out, h*f, w*f]; each level has `layers_per_block + 1` resnets."""

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        block_out_channels: list[int],
        layers_per_block: int,
        groups: int,
        attention_levels: list[int],
        mid_attention: bool,
    ):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        levels = len(block_out_channels)
        self.conv_in = nn.Conv2d(latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = MidBlock(reversed_channels[0], groups, mid_attention)
        # up block i works at encoder level levels-1-i, so attention levels are named as in the encoder
        self.up_blocks = nn.ModuleList(
            UpBlock(
                reversed_channels[max(i - 1, 0)],
                ch,
                layers_per_block + 1,
                groups,
                attention=(levels - 1 - i) in attention_levels,
                up=i < levels - 1,
            )
            for i, ch in enumerate(reversed_channels)
        )
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class PositionNorm(nn.GroupNorm):
    """Normalisation over the channels at each position (GroupNorm's parameters, LayerNorm's statistics): unlike
    GroupNorm, whose statistics span the whole image, a latent then depends only on its receptive field."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        normed = (x - mean) * torch.rsqrt(var + self.eps)
        return normed * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _position_norms(module: nn.Module) -> None:
    """Replace every GroupNorm inside `module` by a PositionNorm of the same width (same parameter names)."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, PositionNorm(1, child.num_channels, eps=child.eps))
        else:
            _position_norms(child)


class Autoencoder(nn.Module):
    """Encoder + 1x1 `quant_conv` to the code space, 1x1 `post_quant_conv` back + decoder (VQModel's layout)."""

    def __init__(
        self,
        block_out_channels: list[int],
        layers_per_block: int,
        latent_channels: int,
        embed_dim: int | None = None,
        norm_num_groups: int = 32,
        attention_levels: list[int] | None = None,
        mid_attention: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_norm: str = "group",
        encoder_receptive: str = "wide",
    ):
        """`embed_dim` is the quantizer's input width (diffusers' `vq_embed_dim`; defaults to `latent_channels`).
        `encoder_norm`: "group" (diffusers' layout) or "position" (the encoder's norms take statistics over the
        channels at each position, so a token depends on its receptive field only: stabler tokens across frames).
        `encoder_receptive`: "wide" (diffusers' layout) or "local" (a token sees its own patch plus a one-pixel rim,
        see `Encoder`; pair it with `encoder_norm: position`, else GroupNorm's statistics still span the image)."""
        super().__init__()
        attention_levels = list(attention_levels or [])
        self.embed_dim = embed_dim or latent_channels
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)
        args = (latent_channels, block_out_channels, layers_per_block, norm_num_groups, attention_levels, mid_attention)
        if encoder_receptive not in ("wide", "local"):
            raise ValueError(f"encoder_receptive: {encoder_receptive!r} is not 'wide' or 'local'")
        self.encoder = Encoder(in_channels, *args, local=encoder_receptive == "local")
        if encoder_norm == "position":
            _position_norms(self.encoder)
        elif encoder_norm != "group":
            raise ValueError(f"encoder_norm: {encoder_norm!r} is not 'group' or 'position'")
        self.quant_conv = nn.Conv2d(latent_channels, self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, latent_channels, 1)
        self.decoder = Decoder(out_channels, *args)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> pre-quantization latents [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(images))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images [B, 3, h*f, w*f] (unclamped)."""
        return self.decoder(self.post_quant_conv(quantized))

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight
