"""`python main.py tokenize`: every split of a sentence data config into token shards, one `predict` run per split
through configs/tokenize.yaml, so work units, claims, resume, manifests and errors are the predict path's own."""

from __future__ import annotations

import sys
from pathlib import Path

from datamodules.sources.base import SPLITS
from lvm_pl.console import UserError, say

TOKENIZE_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tokenize.yaml")


def tokenize(
    configs: list[str],
    ckpt_path: str,
    output_dir: str = "data/tokens",
    splits: list[str] | None = None,
    sentences_per_unit: int | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Tokenize the sentences of each split into `<output_dir>/<split>`, one shard per work unit. Any number of
    processes on any number of machines may run the same command into one shared `output_dir`; rerun it to resume.

    Args:
        configs: the VQGAN's config, then the sentence data config (`-c a.yaml -c b.yaml`, composed in this order).
        ckpt_path: the trained VQGAN checkpoint.
        output_dir: the token shards of split `s` go to `<output_dir>/<s>`.
        splits: splits to tokenize (train, val, test); default: every split the data has sentences in.
        sentences_per_unit: sentences per work unit (one shard each) where the source cuts a split into index
            ranges; default: configs/tokenize.yaml's. Every process sharing an output_dir must use the same.
        overrides: further `--key=value` arguments of `predict`, e.g. `--data.init_args.batch_size=8`.
    """
    from main import cli as main_cli

    def cli(args: list[str], run: bool = True):
        sys.argv[1:] = args  # LightningCLI reads sys.argv (it warns when given args that differ from it)
        return main_cli(None, run=run)

    if not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such file")
    for split in splits or ():
        if split not in SPLITS:
            raise UserError(f"--splits: unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    base = [arg for config in configs for arg in ("-c", config)] + ["-c", TOKENIZE_CONFIG, *(overrides or [])]
    if sentences_per_unit is not None:
        base.append(f"--trainer.callbacks.init_args.sentences_per_unit={sentences_per_unit}")
    if not splits:
        data = cli(base, run=False).datamodule  # run=False: no subcommand, the configs only
        splits = [split for split in SPLITS if data.has_split(split)]
    for split in splits:
        say(f"tokenize {split} -> {output_dir}/{split}")
        cli(
            [
                "predict",
                *base,
                "--ckpt_path",
                ckpt_path,
                f"--data.init_args.predict_split={split}",
                f"--trainer.callbacks.init_args.split={split}",
                f"--trainer.callbacks.init_args.output_dir={output_dir}/{split}",
            ]
        )
