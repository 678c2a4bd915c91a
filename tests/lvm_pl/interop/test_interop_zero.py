"""convert-zero: a DeepSpeed ZeRO checkpoint directory -> one fp32 Lightning checkpoint.

No GPU (and so no DeepSpeed run) is available to these tests: they build the directory layout DeepSpeed writes
(`latest`, `<tag>/mp_rank_00_model_states.pt` or `zero_pp_rank_<r>_mp_rank_00_model_states.pt`, and per rank
`zero_pp_rank_<r>_mp_rank_00_optim_states.pt` holding that rank's partition of the flat fp32 master weights), exactly
the files and keys `deepspeed/utils/zero_to_fp32.py` reads, from a tiny trained LVM, with the DeepSpeed objects its
optimizer states pickle (ZeroStageEnum, a loss scaler, fragment addresses: what files DeepSpeed 0.19.8 writes hold).
This stands in for a DeepSpeed run on GPUs; the conversion code under test is the same.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import cpu_trainer

from datamodules.tokens import TokenDataModule
from lvm_pl import shards
from lvm_pl.console import UserError
from lvm_pl.interop.zero import convert_zero
from lvm_pl.lvm.module import LVM
from lvm_pl.lvm.settings import OptimSettings
from lvm_pl.tokens import TokenLayout

pytest.importorskip("deepspeed")
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

LAYOUT = TokenLayout(codebook_size=32, tokens_per_image=4, num_special=4)
SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "intermediate_size": 64}
WORLD = 2
TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


@pytest.fixture
def trained(tmp_path):
    """A tiny LVM trained 3 steps on shards in tmp_path/data: (its Lightning checkpoint dict, the file)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, LAYOUT.codebook_size, size=(2, LAYOUT.tokens_per_image)) for _ in range(8)]
    shards.write_split(tmp_path / "data", "train", LAYOUT, images)
    data = TokenDataModule(train=str(tmp_path / "data"), val=str(tmp_path / "data"), seq_len=8, batch_size=2)
    trainer = cpu_trainer(max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(LVM(preset="tiny", overrides=SMALL, optim=OptimSettings(warmup_steps=0)), data)
    trainer.save_checkpoint(tmp_path / "reference.ckpt")
    return torch.load(tmp_path / "reference.ckpt", map_location="cpu", weights_only=False), tmp_path / "reference.ckpt"


def _write_zero(directory, checkpoint: dict, stage: int) -> None:
    """The files a ZeRO-`stage` save on WORLD ranks leaves: model states (bf16 module + shapes), fp32 partitions."""
    weights = checkpoint["state_dict"]
    shapes = OrderedDict((k, v.shape) for k, v in weights.items())
    client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    model_state = {
        **client,
        "module": {k: v.to(torch.bfloat16) for k, v in weights.items()},  # training precision; the master is fp32
        "buffer_names": [],
        "param_shapes": [shapes],
        "shared_params": {},
        "frozen_param_shapes": None,
        "ds_version": "0.19.8",
        "optimizer": None,
        "lr_scheduler": None,
        "csr_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": checkpoint["global_step"],
        "dp_world_size": WORLD,
        "mp_world_size": 1,
    }
    if stage == 2:  # one flat fp32 vector of all parameters, padded to 2 * WORLD and cut into WORLD equal pieces
        flat = torch.cat([v.float().flatten() for v in weights.values()])
        flat = torch.nn.functional.pad(flat, (0, -len(flat) % (2 * WORLD)))
        partitions = [[p.clone()] for p in flat.chunk(WORLD)]
        key = "single_partition_of_fp32_groups"
    else:  # each parameter padded to WORLD and cut; rank r holds piece r of every parameter, back to back
        pieces = []
        for v in weights.values():
            per = math.ceil(v.numel() / WORLD)
            pieces.append(torch.nn.functional.pad(v.float().flatten(), (0, per * WORLD - v.numel())).view(WORLD, per))
        partitions = [[torch.cat([p[r] for p in pieces])] for r in range(WORLD)]
        key = "fp32_flat_groups"
    tag = directory / TAG
    tag.mkdir(parents=True)
    (directory / "latest").write_text(TAG)
    names = (
        ["mp_rank_00_model_states.pt"]
        if stage == 2
        else [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(WORLD)]
    )
    for name in names:
        torch.save(model_state, tag / name)
    # DeepSpeed's own objects, as in the files it writes (bf16: a static LossScaler; fp16: a DynamicLossScaler)
    scaler = LossScaler(1.0) if stage == 2 else DynamicLossScaler(2.0**16, 1000, 1.0, 2, False, dtype=torch.float16)
    starts = np.cumsum([0] + [v.numel() for v in weights.values()])[:-1]
    slices = OrderedDict(
        (k, fragment_address(v.numel(), int(o))) for (k, v), o in zip(weights.items(), starts, strict=True)
    )
    for r in range(WORLD):
        optim = {
            "zero_stage": ZeroStageEnum(stage),
            "partition_count": WORLD,
            key: partitions[r],
            "optimizer_state_dict": {},
            "loss_scaler": scaler,
            "param_slice_mappings": [slices],
        }
        torch.save(
            {"optimizer_state_dict": optim, "ds_version": "0.19.8"},
            tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_gives_the_fp32_weights_and_a_checkpoint_lightning_accepts(tmp_path, trained, stage, capfd):
    checkpoint, reference = trained
    _write_zero(tmp_path / "last.ckpt", checkpoint, stage)
    capfd.readouterr()
    convert_zero(str(tmp_path / "last.ckpt"), str(tmp_path / "out" / "lvm.ckpt"))
    shown = capfd.readouterr()
    # its progress shows: our check of the files, then DeepSpeed's own reader (no longer swallowed)
    assert "checking ZeRO files: 100%" in shown.err and "Loading checkpoint shards: 100%" in shown.err
    assert "Processing zero checkpoint" in shown.out

    converted = torch.load(tmp_path / "out" / "lvm.ckpt", map_location="cpu", weights_only=False)
    assert converted.keys() >= {"state_dict", "hyper_parameters", "global_step", "loops"}
    assert converted["global_step"] == 3 and converted["hyper_parameters"]["layout"] == LAYOUT.to_dict()
    original = checkpoint["state_dict"]
    assert list(converted["state_dict"]) == list(original)
    for k, v in original.items():  # bit-exact fp32 master weights, not the bf16 module copy
        assert converted["state_dict"][k].dtype == torch.float32 and torch.equal(converted["state_dict"][k], v), k

    model = LVM.load_from_checkpoint(tmp_path / "out" / "lvm.ckpt")  # no data: the layout comes from the file
    assert model.layout == LAYOUT
    data = TokenDataModule(train=str(tmp_path / "data"), val=str(tmp_path / "data"), seq_len=8, batch_size=2)
    (want,) = cpu_trainer().validate(LVM.load_from_checkpoint(reference), data)
    (got,) = cpu_trainer().validate(model, data)
    (via_ckpt_path,) = cpu_trainer().validate(
        LVM(preset="tiny", overrides=SMALL), data, ckpt_path=str(tmp_path / "out" / "lvm.ckpt")
    )
    assert got["val/loss"] == want["val/loss"] == via_ckpt_path["val/loss"]


def test_bad_inputs_are_user_errors_naming_the_path(tmp_path, trained):
    with pytest.raises(UserError, match=r"checkpoint_dir=.*nope: no such directory"):
        convert_zero(str(tmp_path / "nope"), str(tmp_path / "out.ckpt"))
    _, reference = trained
    with pytest.raises(UserError, match=r"reference.ckpt: a file, not a DeepSpeed ZeRO checkpoint"):
        convert_zero(str(reference), str(tmp_path / "out.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: not a DeepSpeed ZeRO checkpoint \(no `latest`"):
        convert_zero(str(tmp_path / "empty"), str(tmp_path / "out.ckpt"))

    checkpoint, _ = trained
    _write_zero(tmp_path / "partial.ckpt", checkpoint, 2)
    (tmp_path / "partial.ckpt" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a rank died saving
    with pytest.raises(UserError, match=r"partial.ckpt: unreadable ZeRO checkpoint in checkpoint/ \(Expected 2"):
        convert_zero(str(tmp_path / "partial.ckpt"), str(tmp_path / "out.ckpt"))
    for pattern in ("*_optim_states.pt", "*_model_states.pt"):
        for f in (tmp_path / "partial.ckpt" / TAG).glob(pattern):
            f.unlink()
        with pytest.raises(UserError, match=r"not a complete ZeRO checkpoint \(no \*_(optim|model)_states.pt"):
            convert_zero(str(tmp_path / "partial.ckpt"), str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists() and not list(tmp_path.glob(".out.ckpt.*"))  # nothing half-written


def test_a_zero_file_holding_other_objects_is_refused_by_name(tmp_path, trained):
    """DeepSpeed's reader unpickles with weights_only=False; convert-zero reads weights-only and allows only the
    DeepSpeed types above: anything else (an argparse.Namespace, as training scripts pickle) is refused by name."""
    checkpoint, _ = trained
    _write_zero(tmp_path / "last.ckpt", checkpoint, 2)
    optim = tmp_path / "last.ckpt" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({**torch.load(optim, weights_only=False), "extra": argparse.Namespace(lr=0.1)}, optim)
    with pytest.raises(UserError, match=r"rank_1_mp_rank_00_optim_states.pt: holds Python objects .*Namespace"):
        convert_zero(str(tmp_path / "last.ckpt"), str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists()
