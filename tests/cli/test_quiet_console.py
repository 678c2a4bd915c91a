"""A quiet console: a tiny fit, test and predict through `python main.py` print no library warning, and ours are one
line each."""

from __future__ import annotations

import re

import pytest
from helpers import config

# a formatted warning (`path.py:12: Message`, `UserWarning: ...`, `warn(`) or one of Lightning's adverts
LIBRARY_WARNING = re.compile(r"\.py:\d+: |Warning: |warn\(|💡")
# Lightning's worker advice depends on the machine's core count: two workers never draw it
WORKERS = "--data.init_args.num_workers=2"


def library_warnings(text: str) -> list[str]:
    """Warning lines other than ours, which are one line each that starts with `[lvm-pl]`."""
    return [line for line in text.splitlines() if LIBRARY_WARNING.search(line) and not line.startswith("[lvm-pl]")]


@pytest.fixture(scope="module")
def runs(tiny_assets, main_py, tmp_path_factory) -> dict:
    """The three stages, run once in one working directory: fit (resuming `last`), test, predict."""
    cwd = tmp_path_factory.mktemp("quiet")
    vqgan, shards = str(tiny_assets["vqgan_ckpt"]), tiny_assets["shards"]
    small = [WORKERS, "--trainer.enable_progress_bar=false"]
    fit = [
        *("fit", "-c", config("data/tokens.yaml"), "-c", config("lvm/tiny.yaml")),
        *(f"--data.init_args.train={shards / 'train'}", f"--data.init_args.val={shards / 'val'}"),
        *("--data.init_args.batch_size=2", *small),
        *("--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"),
        *("--ckpt_path", "last"),
    ]
    lvm = str(cwd / "runs" / "lvm_tiny" / "checkpoints" / "last.ckpt")
    eval_data = ["--data.init_args.image_size=32", "--data.init_args.source.init_args.splits={test: 2}"]
    test = [
        *("test", "-c", config("lvm/tiny.yaml"), "-c", config("evaluate.yaml"), "-c", config("data/builtin_eval.yaml")),
        *(*eval_data, "--data.init_args.batch_size=2", *small),
        *("--model.init_args.evaluation.context_frames=1", "--model.init_args.evaluation.next_frame_examples=1"),
        *("--model.init_args.tokenizer", vqgan, "--ckpt_path", lvm),
    ]
    predict = [
        *("predict", "-c", config("generate.yaml"), "-c", config("demo/prompts.yaml"), *eval_data[:1]),
        *("--data.init_args.limit=1", "--data.init_args.num_frames=1"),
        *("--model.init_args.tokenizer", vqgan, "--ckpt_path", lvm, "--trainer.callbacks.init_args.output_dir=out"),
    ]
    return {name: main_py(argv, cwd=cwd) for name, argv in (("fit", fit), ("test", test), ("predict", predict))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fit", "test", "predict"])
def test_a_stage_prints_no_library_warning(runs, stage):
    run = runs[stage]
    assert run.returncode == 0, run.stderr[-3000:]
    assert library_warnings(run.stderr + run.stdout) == [], run.stderr[-3000:]


@pytest.mark.slow
def test_our_lines_replace_what_was_silenced(runs):
    assert "[lvm-pl] --ckpt_path last: no last checkpoint yet, training from the start" in runs["fit"].stderr
    test_output = runs["test"].stderr + runs["test"].stdout
    assert "[lvm-pl] target perplexity (codebook ids): " in test_output
    assert "Test metric" not in test_output  # configs/evaluate.yaml: summary lines instead of the long table


def test_the_pattern_sees_the_warnings_it_must():
    lines = [
        "/x/lightning/pytorch/trainer/call.py:283: Be aware that when using `ckpt_path`, callbacks ...",
        "/x/site.py:3: UserWarning: something",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
        "/x/lvm_pl/console.py:25: UserWarning: [lvm-pl] prompt: 4 images",  # ours, but not on one line
        '  rank_zero_warn(f"[lvm-pl] {message}")',
        "[lvm-pl] prompt: 4 images, the context holds 3: the earliest 1 dropped",
    ]
    assert library_warnings("\n".join(lines)) == lines[:5]
