"""Reading checkpoint and weight files as data, never as code.

A `.ckpt`/`.pt`/`.bin` file is a pickle, and unpickling runs whatever the file says. Every read goes through
`torch.load(weights_only=True)` (tensors, containers, numbers, strings and a short allowlist of plain data types);
`weights_only_loads()` forces the same on every `torch.load` a library makes on our behalf (Lightning, DeepSpeed).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lvm_pl.console import UserError

_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_WHY = re.compile(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global by default|\. Please|\n|$)")
_OBJECTS = re.compile(r"global|class|reduce|build|setstate", re.IGNORECASE)  # vs. bytes that are no pickle at all


def load_error(name: str, err: Exception) -> UserError:
    """The one-line error for a file `torch.load(weights_only=True)` failed on; `name` is `key=path` or the path.
    Objects the allowlist refuses (code a pickle would run) are told apart from files that are not readable at all."""
    text = str(err)
    found = _WHY.search(text) if isinstance(err, pickle.UnpicklingError) else None
    if found and _OBJECTS.search(found.group(1)):
        return UserError(
            f"{name}: holds Python objects that weights_only loading refuses ({found.group(1).strip()}): lvm-pl never"
            " unpickles code from a file; if you trust it, load it yourself and re-save its tensors (torch.save of"
            " plain dicts, or safetensors)"
        )
    detail = found.group(1).strip() if found else (text.splitlines()[0] if text else type(err).__name__)
    return UserError(f"{name}: not a readable checkpoint ({detail})")


def load_torch_file(path: str | Path, name: str | None = None, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a missing, foreign or code-carrying file is a UserError naming it
    (`name`, default the path). `mmap` maps tensors instead of reading them (cheap checks of large files)."""
    name = name or str(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (pre-1.6, not zip) format cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise load_error(name, err) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every `torch.load` in the process (and in processes it starts) is weights-only, even a library's
    `weights_only=False` (torch's own switch, `TORCH_FORCE_WEIGHTS_ONLY_LOAD`)."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_NO_FORCE, None)  # torch refuses both set; ours wins
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def deepspeed_state_types() -> list[type]:
    """The plain data classes DeepSpeed pickles into ZeRO optimizer states (found in files DeepSpeed 0.19 writes),
    allowlisted for weights-only reads of them; nothing in them runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
