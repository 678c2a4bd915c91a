"""DeepSpeed ZeRO checkpoint -> one fp32 Lightning checkpoint.

Under the DeepSpeed strategy Lightning saves a checkpoint as a directory (`last.ckpt/` holding `latest` and a tag
folder of per-rank `*_model_states.pt` / `*_optim_states.pt`). `convert_zero` gathers the fp32 master weights into a
single file with the Lightning client state (hyper-parameters, loops, epoch/step) kept, so
`LVM.load_from_checkpoint`, `validate`/`test`/`predict --ckpt_path` and machines without DeepSpeed's world size can
use it. Optimizer states are not carried over: resuming `fit` needs the original directory and the same strategy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from lvm_pl.atomic import atomic_path
from lvm_pl.console import UserError, say
from lvm_pl.safe_load import deepspeed_state_types, load_torch_file, weights_only_loads


def _tag_dir(directory: Path) -> Path:
    """The folder `latest` points at, checked to hold ZeRO model and optimizer states."""
    latest = directory / "latest"
    if not latest.is_file():
        raise UserError(f"checkpoint_dir={directory}: not a DeepSpeed ZeRO checkpoint (no `latest` file in it)")
    tag = directory / latest.read_text().strip()
    for pattern in ("*_model_states.pt", "*_optim_states.pt"):
        if not tag.is_dir() or not any(tag.glob(pattern)):
            raise UserError(f"checkpoint_dir={directory}: not a complete ZeRO checkpoint (no {pattern} in {tag})")
    return tag


def convert_zero(checkpoint_dir: str, out: str) -> None:
    """Consolidate a DeepSpeed ZeRO (stage 2 or 3) checkpoint directory into one fp32 Lightning checkpoint at `out`.

    Args:
        checkpoint_dir: the directory Lightning's DeepSpeed strategy saved (e.g. runs/lvm_7b/checkpoints/last.ckpt).
        out: the file to write (atomically; an existing file is replaced only once the new one is complete).
    """
    directory = Path(checkpoint_dir)
    if not directory.exists():
        raise UserError(f"checkpoint_dir={checkpoint_dir}: no such directory")
    if not directory.is_dir():
        raise UserError(f"checkpoint_dir={checkpoint_dir}: a file, not a DeepSpeed ZeRO checkpoint directory")
    tag = _tag_dir(directory)
    if Path(out).resolve().is_relative_to(directory.resolve()):
        raise UserError(f"out={out}: inside checkpoint_dir={checkpoint_dir}; write the converted file elsewhere")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    try:
        allowed = torch.serialization.safe_globals(deepspeed_state_types())
    except ModuleNotFoundError as err:
        raise UserError(f"convert-zero needs DeepSpeed installed ({err})") from None
    # DeepSpeed's reader unpickles with weights_only=False: here it is forced to weights-only, with DeepSpeed's plain
    # data classes allowed; each file is looked at first (mapped, so cheap) to name the one that holds anything else
    files = sorted(tag.glob("*.pt"))
    with allowed, weights_only_loads():
        for file in tqdm(files, desc="checking ZeRO files", unit="file"):
            load_torch_file(file, mmap=True)
        # DeepSpeed's reader shows its own progress (shards loaded, weights gathered) and what it found; the file it
        # names is the temporary one `out` is renamed from once complete
        say(f"consolidating {tag} ({len(files)} files) into {out}")
        with atomic_path(out) as tmp:
            try:
                checkpoint = convert_zero_checkpoint_to_fp32_state_dict(directory, tmp)
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise UserError(
                    f"checkpoint_dir={checkpoint_dir}: unreadable ZeRO checkpoint in {tag.name}/ ({err})"
                ) from None
    tensors = checkpoint["state_dict"]
    numel = sum(t.numel() for t in tensors.values())
    say(f"wrote {out}: {len(tensors)} fp32 tensors, {numel:,} values, step {checkpoint.get('global_step')}")
