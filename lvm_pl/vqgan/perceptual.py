"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features; nothing is ever downloaded.

The linear heads ship in the `lpips` wheel. The VGG16 backbone (torchvision's ImageNet file vgg16-397923af.pth) is
read from a configured path or the torch hub cache, when `load_backbone` is called (the module's `setup`), so a
tokenizer checkpoint loads without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lvm_pl.console import UserError, warn

VGG_FILE = "vgg16-397923af.pth"
# torchvision's vgg16().features indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def lpips_heads_path() -> Path:
    """The LPIPS v0.1 VGG linear-head weights inside the installed `lpips` wheel."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


class LPIPS(nn.Module):
    """LPIPS(x, y) -> [B] distances for images in [-1, 1]; frozen, never trained."""

    def __init__(self, pretrained: bool = True, vgg_path: str | None = None):
        """`pretrained: false` keeps random VGG features (offline runs and tests) and says so."""
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0, *_SLICE_ENDS[:-1]), _SLICE_ENDS, strict=True))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        # ImageNet normalisation expressed for [-1, 1] inputs (LPIPS' ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.pretrained = pretrained
        self.vgg_path = vgg_path
        self.loaded = False
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: the backbone is a fixed feature extractor."""
        return super().train(False)

    def backbone_file(self) -> Path:
        """Where the VGG16 weights are read from: `vgg_path`, else the torch hub cache."""
        return Path(self.vgg_path).expanduser() if self.vgg_path else hub_checkpoint_dir() / VGG_FILE

    def load_backbone(self) -> None:
        """Load the VGG16 backbone and the linear heads once; UserError names the missing file."""
        if self.loaded:
            return
        heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        if self.pretrained:
            path = self.backbone_file()
            if not path.is_file():
                raise UserError(
                    f"LPIPS needs the VGG16 ImageNet weights {path} (torchvision's {VGG_FILE}): copy it there from a "
                    f"machine with internet (torch hub cache), set loss.init_args.perceptual.init_args.vgg_path, "
                    f"or set perceptual pretrained: false to run random features"
                )
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
                flat = nn.Sequential(*[m for s in self.slices for m in s])
                flat.load_state_dict(features)
            except (RuntimeError, KeyError, OSError) as err:
                raise UserError(f"{path} is not torchvision's VGG16 state dict ({err.__class__.__name__})") from None
        else:
            warn("LPIPS runs on random VGG16 features (perceptual pretrained: false): the perceptual loss is a proxy")
        self.loaded = True

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.loaded:
            self.load_backbone()
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for block, lin in zip(self.slices, self.lins, strict=True):
            hx, hy = block(hx), block(hy)
            diff = (F.normalize(hx, dim=1, eps=1e-10) - F.normalize(hy, dim=1, eps=1e-10)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total  # [B]
