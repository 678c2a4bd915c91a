"""LPIPS: loads a VGG16 state dict from a path (never downloads), matches the lpips package, errors name the file."""

import lpips
import pytest
import torch
from torchvision.models import vgg16

from lvm_pl.console import UserError
from lvm_pl.vqgan.perceptual import LPIPS, VGG_FILE


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hub") / VGG_FILE
    torch.save(vgg16(weights=None).state_dict(), path)
    return path


@pytest.mark.slow
def test_matches_lpips_package(vgg_file):
    ours = LPIPS(pretrained=True, vgg_path=str(vgg_file))
    ours.load_backbone()
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = torch.load(vgg_file, weights_only=True)
    for k in range(1, 6):
        block = getattr(ref.net, f"slice{k}")
        block.load_state_dict(
            {f"{n}.{p}": state[f"features.{n}.{p}"] for n, m in block.named_children() for p, _ in m.named_parameters()}
        )
    x, y = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), atol=1e-5, rtol=1e-4)


def test_hub_cache_lookup_and_missing_file(tmp_path, monkeypatch, vgg_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=VGG_FILE):
        LPIPS(pretrained=True).load_backbone()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / VGG_FILE).symlink_to(vgg_file)
    model = LPIPS(pretrained=True)
    model.load_backbone()
    assert torch.equal(model.slices[0][0].weight, torch.load(vgg_file, weights_only=True)["features.0.weight"])


def test_not_a_vgg_file_and_random_features(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="bad.pth"):
        LPIPS(pretrained=True, vgg_path=str(bad)).load_backbone()
    model = LPIPS(pretrained=False)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in model.parameters())
