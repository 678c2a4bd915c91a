"""lvm-pl's command line: the Lightning stages (fit, validate, test, predict) and the non-Trainer commands.

python main.py fit -c configs/vqgan/tiny.yaml -c configs/data/builtin.yaml
python main.py export-hf --help
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lvm_pl.console import UserError
from lvm_pl.finite import NonFiniteLossError

# Commands that are not Trainer entries: name -> "module:function". jsonargparse builds each one's CLI from its
# signature and docstring, so adding a command is adding one line here.
COMMANDS: dict[str, str] = {
    "preview-data": "datamodules.preview:preview_data",
    "export-hf": "lvm_pl.interop.hf_llama:export_hf",
    "import-hf": "lvm_pl.interop.hf_llama:import_hf",
    "convert-zero": "lvm_pl.interop.zero:convert_zero",
    "demo": "lvm_pl.demo:demo",
}

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
    "plugins": [{"class_path": "lvm_pl.checkpoint_io.AtomicCheckpointIO"}],
}


class LVMCLI(LightningCLI):
    """LightningCLI with model and data in subclass mode; configs compose left to right (`-c a.yaml -c b.yaml`)."""

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        main_kwargs.setdefault("epilog", "other commands: " + ", ".join(sorted(COMMANDS)) + " (each with --help)")
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI torch.loads --ckpt_path itself (for its hyper-parameters) before the Trainer's checkpoint IO
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UserError(f"ckpt_path={path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None


def cli(args: list[str] | None = None, run: bool = True) -> LVMCLI:
    """Build (and by default run) the Trainer CLI; tests call this with `args`."""
    return LVMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # resuming into an existing run directory must not be blocked
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
    )


def resolve_command(name: str) -> Callable:
    """Import the function behind a non-Trainer command."""
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python main.py` and the `lvm` console script."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in COMMANDS:
            from jsonargparse import auto_cli

            auto_cli(resolve_command(args[0]), args=args[1:], as_positional=False)
        else:
            cli(argv)  # None: LightningCLI reads sys.argv itself
    except (UserError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
