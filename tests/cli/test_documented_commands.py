"""Every command the user is shown runs as written: the `python main.py ...` and `make ...` lines of README.md's and
docs/*.md's code blocks, the commands in their inline code (table rows, prose), and every `python main.py` line in
the header comments of configs/**/*.yaml.

Each command runs through the real CLI (a subprocess, forked warm: the `main_py` fixture), in a fresh working
directory per code block (its commands in order, so one command's output is the next one's input, as for the user)
that holds `configs/` and, where a command reads a path the docs assume an earlier step made, a copy of a tiny asset
(tests/conftest.py:tiny_assets). What makes the commands tiny is stated once, below: flags appended to the command
(TINY), files put where the docs name them (ASSETS), placeholders filled in (PLACEHOLDERS), and the commands not run
here, each with its reason (MAKE_COVERED, SKIP). A code block runs each command for one step; a lone command whose
kind (command, model, data and source class) ran a step before runs its setup only (SETUP_ONLY: the configs parse,
the model is built, the data read, the layout and window handshakes made). A command shown twice runs once. Nothing
the user reads is changed; a command that fails as written fails here.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TESTS, compose
from PIL import Image

# ---- the one place that says how the documented commands are made tiny ----------------------------------------------

# `make` targets other tests cover, not run here: each runs much more than a command
MAKE_COVERED = {
    "make demo": "the demo's commands are the README's demo block, run below; tests/cli/test_demo.py checks its stages",
    "make test": "the test suite itself",
    "make bench": "tests/bench/test_bench.py runs every bench script at tiny sizes",
}

# documented commands not run here, and why (an entry no document shows any more fails test_skips_are_current)
SKIP = {
    "make lint": "installs .venv first (the Makefile's stamp); ruff is run by CI's lint step",
    "python main.py demo": "= make demo",
    "python main.py demo --long true": "50 minutes; its commands are the demo's with configs/demo/*_long.yaml "
    "(tests/cli/test_demo.py checks each as a CLI command)",
    "python main.py demo --scaling true": "35 minutes; its fits are the Usage lines of configs/demo/scaling_*.yaml"
    " (run here with the config headers), tests/cli/test_scaling.py checks its curves, CSV, figure and verdict",
    "python main.py convert-zero --checkpoint_dir runs/lvm_300m/checkpoints/last.ckpt --out lvm_300m.ckpt": "needs "
    "a DeepSpeed ZeRO checkpoint directory, which only a GPU run writes; tests/lvm_pl/interop/test_interop_zero.py "
    "runs convert-zero on one laid out as DeepSpeed writes it",
    "python main.py convert-zero --checkpoint_dir <dir> --out <file>": "as the README's convert-zero line",
    "python main.py export-diffusers --checkpoint runs/vqgan_muse/checkpoints/last.ckpt --out_dir vq": "needs a "
    "trained tokenizer of the diffusers layout (configs/vqgan/muse_f16_8192.yaml: 146M parameters, a 0.6 GB file); "
    "tests/lvm_pl/interop/test_interop_diffusers.py exports a small one",
    **{
        f"python main.py stream-tokens --input data/tokens/{s} --output s3://bucket/tokens/{s} --seq_len 4096{w}": "an "
        "S3 bucket; tests/datamodules/test_streaming_tokens.py runs stream-tokens against moto's S3 server"
        for s, w in (("train", ""), ("val", " --windows sentence"))
    },
    "python main.py fit -c configs/lvm/recipe.yaml -c configs/lvm/300m.yaml -c configs/data/tokens_stream.yaml "
    "--data.init_args.train s3://bucket/tokens/train --data.init_args.val s3://bucket/tokens/val": "an S3 bucket; "
    "tests/datamodules/test_streaming_tokens.py trains from one on moto's S3 server",
    "python main.py make-shards -c configs/data/folder.yaml --data.init_args.source.init_args.root /path/to/images "
    "--output_dir s3://bucket/photos --per_shard 1000 --layout image --image_format jpg": "an S3 bucket; "
    "tests/datamodules/ make-shards and tar-shard tests run against moto's S3 server",
    "python main.py fit -c configs/vqgan/recipe.yaml -c configs/vqgan/muse_f16_8192.yaml -c configs/data/tar.yaml "
    "--data.init_args.source.init_args.train s3://bucket/photos/train/shard-*.tar "
    "--data.init_args.source.init_args.val s3://bucket/photos/val/shard-*.tar": "an S3 bucket (the tar source runs "
    "from local shards here: configs/data/tar.yaml's usage line)",
    "python main.py make-shards -c <data config> --output_dir <dir or s3://...> [--per_shard N] "
    "[--layout sentence|image]": "a synopsis ([...]: optional flags), not a command",
    "python main.py make-shards -c <data config> --output_dir <dir or s3://...> [--per_shard N] "
    "[--layout sentence|image] [--image_format png|jpg]": "a synopsis ([...]: optional flags), not a command",
    "python main.py ...": "prose, not a command",
    "python main.py": "prose, not a command",
    "python main.py tokenize": "prose: the command above",
    "python main.py preview-data": "prose: the command's name",
    "python main.py fit -c ... --print_config": "prose: `...` stands for any configs",
    "python main.py test ... --ckpt_path <vqgan.ckpt>": "a table row continuing the row above (`...`: its configs)",
}

# placeholders of the README's table, filled in before the command is split into words
PLACEHOLDERS = {
    "configs/vqgan/<config>.yaml": "configs/vqgan/tiny.yaml",
    "configs/data/<data>.yaml": "configs/data/builtin.yaml",
    "configs/lvm/<size>.yaml": "configs/lvm/300m.yaml",
    "configs/trainer/<strategy>.yaml": "configs/trainer/deepspeed_zero2.yaml",
    "<vqgan config>": "configs/vqgan/tiny.yaml",
    "<data config>": "configs/data/builtin.yaml",
    "<vqgan.ckpt>": "runs/vqgan_tiny/checkpoints/last.ckpt",
    "<lvm.ckpt>": "runs/lvm_tiny/checkpoints/last.ckpt",
    # an absolute output path (the shared file system of docs/corpora.md): written inside the test's directory, never
    # at the root of the machine that runs the tests
    "/shared/tokens": "shared/tokens",
}

# paths the docs name as made by an earlier step (or by the user) -> the tiny asset copied there when a command reads
# it and it does not exist yet (tiny_assets keys; "released:*" are the rebuilt release files of `released` below)
ASSETS = {
    "runs/vqgan_tiny/checkpoints/last.ckpt": "vqgan_ckpt",
    "runs/lvm_tiny/checkpoints/last.ckpt": "lvm_ckpt",
    "data/tokens/train": "shards/train",
    "data/tokens/val": "shards/val",
    "data/tokens/test": "shards/val",
    "data/tokens_long/train": "shards/train",
    "data/tokens_long/val": "shards/val",
    "data/shards": "tar",
    "data/stream/train": "stream/train",
    "data/stream/val": "stream/val",
    "vqgan.ckpt": "vqgan_ckpt",
    "data/images": "folder",
    "/path/to/images": "folder",
    "data/videos": "videos",
    "prompts.yaml": "prompts_file",
    "prompts": "prompts_folder",
    "vqgan_dir": "released:muse",
    "lvm_7b_dir": "released:hf",
    **{
        name: f"released:frame{i % 3}" for i, name in enumerate(["a.png", "b.png", "c.png", "A.png", "A2.png", "B.png"])
    },
}
# flags whose value a command writes, never an input to provide
OUTPUT_FLAGS = ("--out", "--out_dir", "--output_dir", "--output", "--trainer.callbacks.init_args.output_dir")

TRAINER_STEPS = [
    "--trainer.max_steps=1",
    "--trainer.max_time=null",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
]
# a lone command of a kind (command, model, data, source) run for one step above already: setup only (the model built,
# the data read, the window and layout handshakes), no step
SETUP_ONLY = [
    "--trainer.limit_train_batches=0",
    "--trainer.limit_val_batches=0",
    "--trainer.limit_test_batches=0",
    "--trainer.limit_predict_batches=0",
]
GPU_TO_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
]
VIDEO_CLIPS = [
    "--data.init_args.source.init_args.length=4",
    "--data.init_args.source.init_args.stride=4",
    "--data.init_args.min_images=4",
]


@dataclass(frozen=True)
class Tiny:
    """Flags appended to a command when `applies(command words, composed config)` holds; `why` says what for."""

    why: str
    applies: Callable[[list[str], dict], bool]
    flags: Callable[[dict], list[str]]


def _data(cfg: dict) -> dict:
    return (cfg.get("data") or {}).get("init_args") or {}


def _source(cfg: dict) -> str:
    return str((_data(cfg).get("source") or {}).get("class_path", ""))


def _gpu(cfg: dict) -> bool:
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    return trainer.get("accelerator") in ("gpu", "cuda") or any(s in name.lower() for s in ("deepspeed", "fsdp"))


def _lvm(cfg: dict) -> bool:
    return str((cfg.get("model") or {}).get("class_path")).endswith(".LVM")


def _pretrained(block, prefix: str = "--model"):
    """The dotted flag of every `pretrained` key inside a YAML block (the VGG16 backbone is not shipped)."""
    if isinstance(block, dict):
        for k, v in block.items():
            if k == "pretrained":
                yield f"{prefix}.{k}=false"
            yield from _pretrained(v, f"{prefix}.{k}")


def _trainer(words: list[str]) -> bool:
    """A Trainer command, or `tokenize` (its `--data.*`/`--trainer.*` flags pass on to the predict runs it makes)."""
    return words[0] in ("fit", "validate", "test", "predict", "tokenize")


def _has(key: str) -> Callable[[list[str], dict], bool]:
    return lambda w, c: _trainer(w) and key in _data(c)


TINY = [
    Tiny(
        "Trainer commands: one step, one batch per evaluation loop (tokenize: every work unit, or no manifest)",
        lambda w, c: _trainer(w) and w[0] != "tokenize",
        lambda c: TRAINER_STEPS,
    ),
    Tiny(
        "GPU trainers on the CPU (their own runs: the `gpu` tests)",
        lambda w, c: _trainer(w) and _gpu(c),
        lambda c: GPU_TO_CPU,
    ),
    Tiny(
        "paper-size LVMs: the tiny preset (a checkpoint's own preset wins)",
        lambda w, c: _trainer(w) and _lvm(c),
        lambda c: ["--model.init_args.preset=tiny"],
    ),
    Tiny("images at the tiny assets' 32 px", _has("image_size"), lambda c: ["--data.init_args.image_size=32"]),
    Tiny("small batches", _has("batch_size"), lambda c: ["--data.init_args.batch_size=2"]),
    Tiny("no loader workers", _has("num_workers"), lambda c: ["--data.init_args.num_workers=0"]),
    Tiny("up to 4 images a sentence", _has("max_images"), lambda c: ["--data.init_args.max_images=4"]),
    Tiny("two prompts", _has("limit"), lambda c: ["--data.init_args.limit=2"]),
    Tiny(
        "a few built-in sentences",
        lambda w, c: _trainer(w) and _source(c).endswith("BuiltinSource"),
        lambda c: ["--data.init_args.source.init_args.splits={train: 8, val: 4, test: 4}"],
    ),
    Tiny(
        "the StyleGAN discriminator's image_size, where the command gives it, at the tiny images' size",
        lambda w, c: "--model.init_args.loss.init_args.discriminator.init_args.image_size" in w,
        lambda c: ["--model.init_args.loss.init_args.discriminator.init_args.image_size=32"],
    ),
    Tiny("clips of 4 frames", lambda w, c: _trainer(w) and _source(c).endswith("VideoSource"), lambda c: VIDEO_CLIPS),
    Tiny(
        "random VGG16 features (no weights shipped)",
        lambda w, c: _trainer(w),
        lambda c: list(_pretrained(c.get("model"))),
    ),
    Tiny(
        "import-hf: the rebuilt release's sizes",
        lambda w, c: w[0] == "import-hf" and "--codebook_size" in w,
        lambda c: ["--codebook_size", "64", "--tokens_per_image", "16"],
    ),
]

# ---- reading the documents ------------------------------------------------------------------------------------------

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
COMMAND = re.compile(r"^(python main\.py\b.*|make \w.*)$")
INLINE = re.compile(r"`(python main\.py\b[^`]*|make \w[^`]*)`")
CONFIG_LINE = re.compile(r"^#\s*(?:Usage:\s*)?(python main\.py .*)$")


@dataclass(frozen=True)
class Documented:
    """One command as a document shows it: `where` (file:line) and `raw`, its shell text (continuations joined)."""

    where: str
    raw: str

    @property
    def text(self) -> str:
        """The command without its comment and spacing, as MAKE_COVERED and SKIP name it."""
        return " ".join(shlex.split(self.raw, comments=True))


def _joined(lines: list[str], i: int, strip: Callable[[str], str]) -> tuple[str, int]:
    """Line `i` with the lines it continues onto (a trailing backslash), and the index after them."""
    text = strip(lines[i])
    while text.endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + " " + strip(lines[i])
    return text, i + 1


def markdown_commands(rel: str) -> list[list[Documented]]:
    """The commands of a markdown file: one group per fenced block (run in order), one per inline code span."""
    lines = (REPO / rel).read_text().splitlines()
    groups, prose, i = [], [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        language, block = fence[3:].strip(), []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            if language != "python" and COMMAND.match(lines[i].strip()):
                line = i + 1
                text, i = _joined(lines, i, str.strip)
                block.append(Documented(f"{rel}:{line}", text))
            else:
                i += 1
        i += 1
        if block:
            groups.append(block)
    text = "\n".join(line for _, line in prose)
    for found in INLINE.finditer(text):
        line = prose[text.count("\n", 0, found.start())][0]
        groups.append([Documented(f"{rel}:{line}", found.group(1))])
    return groups


def config_commands(rel: str) -> list[list[Documented]]:
    """A config's header commands (its `# Usage:` line and any other `# python main.py` line), as one group."""
    lines = (REPO / rel).read_text().splitlines()
    group, i = [], 0
    while i < len(lines) and lines[i].startswith("#"):
        found = CONFIG_LINE.match(lines[i])
        if found:
            line = i + 1
            text, i = _joined(lines, i, lambda s: s.lstrip("#").strip().removeprefix("Usage:").strip())
            group.append(Documented(f"{rel}:{line}", text))
        else:
            i += 1
    return [group] if group else []


def words_of(raw: str) -> list[str]:
    """A command's words after `python main.py`, placeholders filled in."""
    for placeholder, value in PLACEHOLDERS.items():
        raw = raw.replace(placeholder, value)
    return shlex.split(raw, comments=True)[2:]


def documented_groups() -> list[list[Documented]]:
    """Every documented command, grouped as it runs; a lone command shown before (alone or in a block) is kept once."""
    seen, out = set(), []
    for group in DOCUMENTED:
        if len(group) > 1 or tuple(words_of(group[0].raw)) not in seen:
            out.append(group)
        seen |= {tuple(words_of(c.raw)) for c in group}
    return out


def kind(words: list[str], cfg: dict) -> tuple:
    """What a command exercises: the command, and its model, data and source classes."""
    block = lambda key: (cfg.get(key) or {}).get("class_path")  # noqa: E731
    return words[0], block("model"), block("data"), _source(cfg)


DOCUMENTED = [g for rel in DOCS for g in markdown_commands(rel)] + [g for rel in CONFIGS for g in config_commands(rel)]
GROUPS = documented_groups()

# ---- running them ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """The released LVM's formats, rebuilt small (tests/lvm_pl/interop/released_lvm.py): an open-muse VQGAN directory,
    a LLaMA saved as sharded safetensors, and three 16 px frames."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("released_lvm", TESTS / "lvm_pl" / "interop" / "released_lvm.py")
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    root = tmp_path_factory.mktemp("released")
    release.save_muse(release.muse_model(), root / "muse")
    release.save_llama_safetensors(release.llama(4 * release.TOKENS_PER_IMAGE), root / "hf")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"frame{i}.png")
    return {name: root / name for name in ["muse", "hf", "frame0.png", "frame1.png", "frame2.png"]}


def _asset(key: str, tiny_assets: dict, released: dict) -> Path:
    if key.startswith("released:"):
        return released[key.removeprefix("released:") + (".png" if key.startswith("released:frame") else "")]
    first, _, rest = key.partition("/")
    return tiny_assets[first] / rest if rest else tiny_assets[first]


def _inputs(words: list[str], cfg: dict) -> set[str]:
    """What a command may read: its words (but the values of output flags) and the strings of its model and data."""
    out = {w for i, w in enumerate(words) if i == 0 or words[i - 1] not in OUTPUT_FLAGS}

    def strings(block):
        if isinstance(block, dict):
            for v in block.values():
                yield from strings(v)
        elif isinstance(block, list):
            for v in block:
                yield from strings(v)
        elif isinstance(block, str):
            yield block

    return out | set(strings(cfg.get("model"))) | set(strings(cfg.get("data")))


def provide(workdir: Path, words: list[str], cfg: dict, tiny_assets: dict, released: dict) -> None:
    """Copy the assets a command reads into `workdir`, where the docs say an earlier step made them."""
    inputs = _inputs(words, cfg)
    # a path or one inside it (a glob such as data/shards/train/shard-*.tar)
    for path in sorted(p for p in ASSETS if any(i == p or i.startswith(p + "/") for i in inputs)):
        target = workdir / path
        if path.startswith("/") or target.exists():
            continue  # absolute example paths are substituted in the words (tiny_argv)
        source = _asset(ASSETS[path], tiny_assets, released)
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)


def composed(words: list[str]) -> dict:
    """The command's `-c` configs (and preview-data's `--data`) merged as the CLI merges them (`tokenize` adds
    configs/tokenize.yaml last)."""
    files = [words[i + 1] for i, w in enumerate(words) if w in ("-c", "--config", "--data") and i + 1 < len(words)]
    return compose(
        [f for f in files if (REPO / f).is_file()] + (["configs/tokenize.yaml"] if words[0] == "tokenize" else [])
    )


def tiny_argv(raw: str, workdir: Path, tiny_assets: dict, released: dict) -> tuple[list[str], list[str]]:
    """(the command's words after `python main.py`, the TINY flags appended to them)."""
    words = words_of(raw)
    cfg = composed(words)
    provide(workdir, words, cfg, tiny_assets, released)
    # an absolute example path (`/path/to/images`) cannot be made in the working directory: the asset stands in
    words = [str(_asset(ASSETS[w], tiny_assets, released)) if w.startswith("/") and w in ASSETS else w for w in words]
    extra = [flag for rule in TINY if words and rule.applies(words, cfg) for flag in rule.flags(cfg)]
    return words, extra


def _feeds(group: list[Documented], i: int) -> bool:
    """Whether a later command of the block may read what command `i` writes (a checkpoint, shards)."""
    return any(".ckpt" in c.raw or "data/tokens" in c.raw for c in group[i + 1 :])


def _setup_only() -> set[str]:
    """The Trainer commands whose kind another command runs for a step: per kind, the first whose output a later
    command of its block may read, else the first on a tiny config, else the first."""
    by_kind: dict[tuple, list[tuple[Documented, bool]]] = {}
    for group in GROUPS:
        for i, command in enumerate(group):
            words = words_of(command.raw)
            if command.text in SKIP or command.text in MAKE_COVERED or not _trainer(words) or words[0] == "tokenize":
                continue
            by_kind.setdefault(kind(words, composed(words)), []).append((command, _feeds(group, i)))
    out = set()
    for commands in by_kind.values():
        tiny = [c for c, _ in commands if any(w.endswith("/tiny.yaml") for w in words_of(c.raw))]
        feeding = [c for c, feeds in commands if feeds]
        out |= set(c.text for c, _ in commands) - {(feeding or tiny or [commands[0][0]])[0].text}
    return out


SETUP_ONLY_COMMANDS = _setup_only()


def _id(group: list[Documented]) -> str:
    return group[0].where


def _runs_a_step(command: Documented) -> bool:
    """A Trainer command run for a step (not stopped at setup): ~10 s on 2 cores even when tiny."""
    words = words_of(command.raw)
    skipped = command.text in SKIP or command.text in MAKE_COVERED or command.text in SETUP_ONLY_COMMANDS
    return bool(words) and _trainer(words) and not skipped


def _param(group: list[Documented]):
    """A block of several commands (a chain of runs, 5-50 s on 2 cores) or one that runs a Trainer step: `slow`, out
    of the inner loop, which keeps the commands that print, parse or stop at setup."""
    slow = len(group) > 1 or any(_runs_a_step(c) for c in group)
    return pytest.param(group, marks=pytest.mark.slow) if slow else group


@pytest.mark.parametrize("group", [_param(g) for g in GROUPS], ids=_id)
def test_documented_commands_run_as_written(group, main_py, tiny_assets, released, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "configs").symlink_to(REPO / "configs")
    for command in group:
        if command.text in MAKE_COVERED or command.text in SKIP:
            continue
        if command.text.startswith("make "):
            pytest.fail(f"{command.where}: `{command.text}` is neither run here nor listed in MAKE_COVERED/SKIP")
        words, extra = tiny_argv(command.raw, workdir, tiny_assets, released)
        extra += SETUP_ONLY if command.text in SETUP_ONLY_COMMANDS else []
        done = main_py([*words, *extra], cwd=workdir)
        assert done.returncode == 0, (
            f"{command.where}: `{command.text}` failed (exit {done.returncode}; tiny flags {extra})\n"
            + "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        )


def test_a_data_window_longer_than_the_model_stops_at_setup(main_py, tiny_assets, released, tmp_path):
    """A data config and a model that disagree on the window: exit 2 at setup, one line naming both values and the
    fix, nothing trained."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    command = "python main.py fit -c configs/lvm/tiny.yaml -c configs/data/tokens.yaml --data.init_args.seq_len 4096"
    words, extra = tiny_argv(command, tmp_path, tiny_assets, released)
    done = main_py([*words, *extra], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.seq_len=4096 is longer than the model's block_size=256: leave"), last
    assert "seq_len unset" in last and "overrides.block_size to 4096" in last and "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "lvm_tiny" / "checkpoints").exists()


def test_every_document_and_config_shows_its_commands():
    """The extraction finds the commands it must (a reader that found nothing would pass everything)."""
    texts = {c.text for g in DOCUMENTED for c in g}
    where = {c.where.split(":")[0] for g in DOCUMENTED for c in g}
    assert {"README.md", "docs/shards.md", "docs/reliability.md"} <= where
    assert set(CONFIGS) <= where, sorted(set(CONFIGS) - where)
    for rel in CONFIGS:  # each config's header runs it (tokenize composes configs/tokenize.yaml itself)
        named = {w for c in config_commands(rel)[0] for w in words_of(c.raw) if w.endswith(".yaml")}
        assert rel in named | {"configs/tokenize.yaml"}, f"{rel}: its header's commands do not use it"
    assert "python main.py fit -c configs/data/tokens.yaml -c configs/lvm/tiny.yaml" in texts
    assert sum(len(g) for g in DOCUMENTED) > 50


def test_skips_are_current():
    """Every skip names a command some document still shows."""
    texts = {c.text for g in DOCUMENTED for c in g}
    assert not (SKIP.keys() | MAKE_COVERED.keys()) - texts, sorted((SKIP.keys() | MAKE_COVERED.keys()) - texts)
