"""lvm-pl's command line: the Lightning stages (fit, validate, test, predict) and the non-Trainer commands.

python main.py fit -c configs/vqgan/tiny.yaml -c configs/data/builtin.yaml
python main.py export-hf --help
python main.py prompt --lvm LVM.ckpt --tokenizer VQGAN.ckpt --images a.png b.png c.png --out out/
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy

from lvm_pl.checkpoint_io import check_stage
from lvm_pl.cli_errors import user_message
from lvm_pl.console import UserError, say
from lvm_pl.quiet import ignoring, quiet_process
from lvm_pl.safe_load import deepspeed_state_types, load_error, weights_only_loads

# Commands that are not Trainer entries: name -> "module:function". jsonargparse builds each one's CLI from its
# signature and docstring, so adding a command is adding one line here.
COMMANDS: dict[str, str] = {
    "preview-data": "datamodules.preview:preview_data",
    "export-hf": "lvm_pl.interop.hf_llama:export_hf",
    "import-hf": "lvm_pl.interop.hf_llama:import_hf",
    "import-vqgan": "lvm_pl.interop.vqgan_import:import_vqgan",
    "export-diffusers": "lvm_pl.interop.diffusers_vq:export_diffusers",
    "prompt": "lvm_pl.prompting:prompt",
    "convert-zero": "lvm_pl.interop.zero:convert_zero",
    "demo": "lvm_pl.demo:demo",
    "tokenize": "lvm_pl.tokenize:tokenize",
    "stream-tokens": "datamodules.stream_tokens:stream_tokens",
    "make-shards": "datamodules.make_shards:make_shards",
}

# Options that take several values the shell way (`--images a.png b.png`): jsonargparse wants one JSON list
LIST_OPTIONS: dict[str, tuple[str, ...]] = {
    "prompt": ("--images",),
    "tokenize": ("--splits",),
    "make-shards": ("--splits",),
}
# Commands that take configs the Trainer's way (`-c a.yaml`, `--data.* value`): see config_args
CONFIG_COMMANDS = ("tokenize", "make-shards", "preview-data")

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
        epilog = "other commands: " + ", ".join(sorted(COMMANDS)) + " (each with --help); --debug: full tracebacks"
        main_kwargs.setdefault("epilog", epilog)
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def parse_arguments(self, parser, args) -> None:
        check_renamed_keys(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own reading of --ckpt_path's hyper-parameters into the config (before the Trainer's
        checkpoint IO), with unreadable files named and a flat-argument LVM's hyper-parameters migrated."""
        if not self.config.get("subcommand"):
            return
        path = self.config[self.config.subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        # a checkpoint of the other stage would rebuild the wrong class below: it stops here, naming both
        model = self.config[self.config.subcommand].get("model")
        if model is not None:
            check_stage(path, model.get("class_path"), self.config.subcommand)
        try:
            hparams = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise load_error(f"ckpt_path={path}", err) from None
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            if class_path.endswith(".LVM"):
                from lvm_pl.lvm.module import migrate_hparams

                hparams = migrate_hparams(hparams)
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _set_seed(self) -> None:
        # `seed_everything: true` (the default) seeds 0 unless PL_GLOBAL_SEED is set; Lightning warns that it found no
        # seed and then says "Seed set to 0" on the next line: the second line is the one that informs
        with ignoring((r"No seed found", r"lightning\.fabric\.utilities\.seed")):
            super()._set_seed()

    def _run_subcommand(self, subcommand: str) -> None:
        found = []
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if subcommand == "fit" and ckpt_path == "last" and _last_checkpoints(self.trainer) == []:
            # resuming with `--ckpt_path last` is how the docs and the demo train; a first run has nothing to resume,
            # which is said in one line here instead of Lightning's warning and its hint (save_last is set)
            say("--ckpt_path last: no last checkpoint yet, training from the start")
            found.append(
                (
                    r'\.fit\(ckpt_path="last"\) is set, but there is no last',
                    r"lightning\.pytorch\.trainer\.connectors\.checkpoint_connector",
                )
            )
        if subcommand != "fit" and ckpt_path:
            # test/validate/predict of a checkpoint that fit wrote: its ModelCheckpoint/Timer states serve resuming only
            found.append((r"Be aware that when using `ckpt_path`", r"lightning\.pytorch\.trainer\.call"))
        if subcommand == "predict" and type(self.model).__name__ == "LVM":
            # generating: the time is the model's; workers for a few prompt images would not shorten it
            found.append(
                (r"The '\w+' does not have many workers", r"lightning\.pytorch\.trainer\.connectors\.data_connector")
            )
        with ignoring(*found):
            super()._run_subcommand(subcommand)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed resumes a ZeRO directory with its own torch.load; main() makes it weights-only, so the plain
            # data classes DeepSpeed pickles into optimizer states must be allowed
            torch.serialization.add_safe_globals(deepspeed_state_types())
        return trainer


def _last_checkpoints(trainer: Trainer) -> list[Path] | None:
    """The `last.ckpt` files the Trainer's checkpoint callbacks would resume from; None where one has no save_last or
    no dirpath yet (Lightning's own warning then stays: its hint applies)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    if not callbacks or any(not c.save_last or c.dirpath is None for c in callbacks):
        return None
    paths = [Path(c.dirpath) / f"{c.CHECKPOINT_NAME_LAST}{c.FILE_EXTENSION}" for c in callbacks]
    return [p for p in paths if p.exists()]


def check_renamed_keys(args: list[str]) -> None:
    """Refuse, in one line naming the new key, an LVM argument that a config file or flag gives by its old name."""
    from lvm_pl.lvm.module import RENAMED

    def refuse(where: str, old: str) -> None:
        new = RENAMED[old]
        instead = f"model.init_args.{new}" if new else "nothing: the vocabulary comes from the token layout"
        raise UserError(f"{where}: model.init_args.{old} is no longer an LVM argument; use {instead}")

    model_class, flags = "", []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            try:
                config = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            except yaml.YAMLError:
                continue  # the parser reports it
            model = config.get("model") if isinstance(config, dict) else None
            model_class = str(model.get("class_path", model_class)) if isinstance(model, dict) else model_class
            init = model.get("init_args") if isinstance(model, dict) else None
            if isinstance(init, dict) and model_class.endswith(".LVM"):
                for old in sorted(init.keys() & RENAMED.keys()):
                    refuse(args[i + 1], old)
        elif arg.startswith("--model."):
            flags.append(arg.split("=", 1)[0])
    for flag in flags if model_class.endswith(".LVM") else []:
        key = flag.removeprefix("--model.").removeprefix("init_args.")
        if key in RENAMED:
            refuse(flag, key)


def cli(args: list[str] | None = None, run: bool = True) -> LVMCLI:
    """Build (and by default run) the Trainer CLI; tests call this with `args`."""
    return LVMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # resuming into an existing run directory must not be blocked
        trainer_defaults=TRAINER_DEFAULTS,
        # parse errors raise (ArgumentError) instead of printing the usage: main() words them, naming the file
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in LVMCLI.subcommands()}},
        args=args,
        run=run,
    )


def resolve_command(name: str) -> Callable:
    """Import the function behind a non-Trainer command."""
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def gather_lists(command: str, args: list[str]) -> list[str]:
    """`--opt a b c` -> `--opt ["a", "b", "c"]` for the command's LIST_OPTIONS (values run to the next `--` flag)."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] in LIST_OPTIONS.get(command, ()):
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            out.append(json.dumps(args[i + 1 : j]))
            i = j
        else:
            i += 1
    return out


def config_args(command: str, args: list[str]) -> list[str]:
    """A CONFIG_COMMANDS command's `-c a.yaml` -> `--configs+ a.yaml` (the function's own `--config` is
    jsonargparse's), and the flags it passes on (`--data.*`, `--trainer.*`, `--model.*`) -> `--overrides+ flag`;
    `preview-data` reads the configs' `data:` sections only, and keeps its old `--data a.yaml` as a spelling of `-c`."""
    out, i = [], 0
    while i < len(args):
        if (args[i] in ("-c", "--config") or (command == "preview-data" and args[i] == "--data")) and i + 1 < len(args):
            out += ["--configs+", args[i + 1]]
            i += 2
            continue
        if command != "preview-data" and args[i].split(".", 1)[0] in ("--data", "--trainer", "--model"):
            flag = args[i] if "=" in args[i] or i + 1 >= len(args) else f"{args[i]}={args[i + 1]}"
            out.append(f"--overrides+={flag}")  # one token: argparse reads a separate `--x` value as an option
            i += 1 if "=" in args[i] else 2
            continue
        out.append(args[i])
        i += 1
    return out


def fail(err: Exception, args: list[str], command: Callable | None = None) -> None:
    """The one place errors reach the user: a user's mistake is one `error:` line and exit code 2; anything else is
    a bug and keeps its traceback (as does everything with `--debug` or `LVM_PL_DEBUG=1`)."""
    message = None if os.environ.get("LVM_PL_DEBUG") == "1" else user_message(err, args, command)
    if message is None:
        raise err
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python main.py` and the `lvm` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        os.environ["LVM_PL_DEBUG"] = "1"
    if argv is None:
        sys.argv[1:] = args
    quiet_process()
    command = resolve_command(args[0]) if args and args[0] in COMMANDS else None
    try:
        with weights_only_loads():  # every file read is data: no torch.load below unpickles code
            if command is not None:
                from jsonargparse import auto_cli

                given = config_args(args[0], args[1:]) if args[0] in CONFIG_COMMANDS else args[1:]
                cmd_args = gather_lists(args[0], given)
                auto_cli(command, args=cmd_args, as_positional=False, exit_on_error=False)
            else:
                cli(None if argv is None else args)  # None: LightningCLI reads sys.argv (it warns when given both)
    except Exception as err:  # noqa: BLE001 - sorted into the user's mistakes and bugs by fail()
        fail(err, args, command)


if __name__ == "__main__":
    main()
