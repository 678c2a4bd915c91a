"""Bad input through the real command line, as a table: for each case, exit code 2, no traceback, exactly one
`error:` line that says what the table says (naming the file, key or value), and no new or changed file in the
case's directory, where good outputs of earlier runs are planted (checkpoints, token shards, PNGs, an export).

The commands run as `main.py` as `__main__` in forked children of one warm process (tests/cli_runner.py), 3 at a
time. Disk-full and read-only cases run in a small tmpfs (needs root). docs/reliability.md's "Bad input" table is
generated from CASES: `python tests/cli/test_reliability_cli_table.py` rewrites it, and a test fails when it differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/ holds cli_runner
from cli_runner import run_commands  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- errors-table:start -->", "<!-- errors-table:end -->"
PARALLEL = 3


STORAGE = {"ro": "read-only tmpfs", "full": "full tmpfs", "page": "tmpfs, 4 KiB free", "small": "tmpfs, 1 MiB free"}


@dataclass(frozen=True)
class Case:
    stage: str
    name: str
    what: str  # the bad input, for the doc
    argv: list[str]  # {R}: configs/, {A}: tiny_assets, {I}: this file's inputs, {cwd}, {logs}
    says: list[str]  # fragments the one `error:` line must contain, in order
    storage: str | None = None  # a key of STORAGE: the case's cwd is such a tmpfs
    plant: tuple[str, ...] = ("lvm_ckpt", "vqgan_ckpt", "shards", "png", "export")


QUIET = ["--trainer.logger=false", "--trainer.default_root_dir={logs}"]
LVM = ["-c", "{R}/lvm/tiny.yaml", "-c", "{R}/data/tokens.yaml", *QUIET]
LVM_DATA = ["--data.init_args.train={A}/shards/train", "--data.init_args.val={A}/shards/val"]
LVM_FIT = [*LVM, *LVM_DATA, "--data.init_args.seq_len=64", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
LVM_TEST = ["-c", "{R}/lvm/tiny.yaml", "-c", "{R}/data/tokens_eval.yaml", *QUIET]
LVM_TEST += ["--data.init_args.test={A}/shards/val"]
SMALL = [
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--data.init_args.source.init_args.splits={train: 8, val: 4, test: 4}",
]
VQGAN = ["-c", "{R}/vqgan/tiny.yaml", "-c", "{R}/data/builtin.yaml", *QUIET, *SMALL]
VQGAN_FIT = [*VQGAN, "--trainer.max_steps=1", "--trainer.max_time=null", "--trainer.limit_val_batches=0"]
TOKENIZE = [*VQGAN, "-c", "{R}/tokenize.yaml", *QUIET, "--data.init_args.max_images=4", "--ckpt_path={A}/vqgan.ckpt"]
EVAL = [
    *["-c", "{R}/lvm/tiny.yaml", "-c", "{R}/evaluate.yaml", "-c", "{R}/data/builtin_eval.yaml", *QUIET],
    *["--data.init_args.num_workers=0", "--data.init_args.batch_size=2"],
    *["--data.init_args.source.init_args.splits={train: 0, val: 0, test: 2}", "--ckpt_path={A}/lvm.ckpt"],
]
PROMPT = [
    *["-c", "{R}/generate.yaml", *QUIET, "--ckpt_path={A}/lvm.ckpt", "--model.init_args.tokenizer={A}/vqgan.ckpt"],
    *["--data.init_args.image_size=32", "--data.init_args.limit=1", "--data.init_args.batch_size=1"],
    *["--data.init_args.source.init_args.splits={train: 1, val: 2, test: 1}"],
    *["--model.init_args.generation.num_candidates=1", "--trainer.accelerator=cpu"],
]
NO_TOKENIZER = [a for a in PROMPT if "tokenizer" not in a]

CASES = [
    # --- LVM stage: fit / validate / test
    Case("LVM fit", "lvm_unknown_flag", "unknown init arg on the command line", ["fit", *LVM_FIT,
         "--model.init_args.no_such_key=1"], ["command line: model.init_args.no_such_key: no such key"]),
    Case("LVM fit", "lvm_yaml_unknown_key", "misspelt Trainer key in a YAML", ["fit", *LVM_FIT, "-c", "{I}/typo.yaml"],
         ["typo.yaml:3: trainer.max_stepz: no such key (did you mean max_steps"]),
    Case("LVM fit", "lvm_yaml_wrong_type", "wrong type in a YAML", ["fit", *LVM_FIT, "-c", "{I}/wrong_type.yaml"],
         ["wrong_type.yaml:4: model.init_args.optim.lr: expected float, got 'fast'"]),
    Case("LVM fit", "lvm_yaml_class_typo", "mistyped data class_path in a YAML", ["fit", *LVM_FIT, "-c",
         "{I}/class_typo.yaml"], ["class_typo.yaml:2: data.class_path: no class 'datamodules.tokens.TokenDataModul'",
         "did you mean datamodules.tokens.TokenDataModule?"]),
    Case("LVM fit", "lvm_invalid_yaml", "a YAML that does not parse", ["fit", *LVM_FIT, "-c", "{I}/invalid.yaml"],
         ["invalid.yaml:3: not valid YAML (expected ',' or ']'"]),
    Case("LVM fit", "lvm_no_manifest", "token directory without a manifest (raised while the DataModule is built)",
         ["fit", *LVM_FIT, "--data.init_args.train={I}/empty"], ["empty/manifest.json: no token manifest here"]),
    Case("LVM fit", "lvm_corrupt_manifest", "corrupt manifest.json", ["fit", *LVM_FIT,
         "--data.init_args.train={I}/corrupt"], ["corrupt/manifest.json: unreadable manifest"]),
    Case("LVM fit", "lvm_renamed_key", "an argument of the flat-argument LVM (renamed)", ["fit", *LVM_FIT,
         "--model.init_args.warmup_steps=3"], ["model.init_args.warmup_steps is no longer an LVM argument; use "
         "model.init_args.optim.warmup_steps"]),
    Case("LVM fit", "lvm_foreign_checkpoint", "--ckpt_path of a LightningModule that records no class", ["fit",
         *LVM_FIT, "--ckpt_path={I}/boring.ckpt"], ["boring.ckpt: not an LVM checkpoint"]),
    Case("LVM fit", "lvm_other_class_checkpoint", "--ckpt_path saved by the CLI from another LightningModule", ["fit",
         *LVM_FIT, "--ckpt_path={I}/other_class.ckpt"], ["other_class.ckpt: a checkpoint of test_reliability_cli_table"
         ".OtherModule", "fit needs lvm_pl.lvm.module.LVM", "model.class_path: test_reliability_cli_table."]),
    Case("LVM test", "lvm_test_tokenizer_checkpoint", "the tokenizer's checkpoint as the LVM's --ckpt_path", ["test",
         *LVM_TEST, "--ckpt_path={A}/vqgan.ckpt"], ["vqgan.ckpt: a VQGAN tokenizer checkpoint",
         "test needs lvm_pl.lvm.module.LVM", "--model.init_args.tokenizer="]),
    Case("LVM validate", "lvm_truncated_checkpoint", "truncated --ckpt_path", ["validate", *LVM, *LVM_DATA,
         "--ckpt_path={I}/truncated.ckpt"], ["truncated.ckpt: not a readable checkpoint"]),
    Case("LVM test", "lvm_missing_checkpoint", "--ckpt_path that does not exist", ["test", *LVM_TEST,
         "--ckpt_path={I}/missing.ckpt"], ["missing.ckpt: no such checkpoint file"]),
    Case("LVM fit", "lvm_read_only_checkpoints", "checkpoint directory on a read-only file system", ["fit", *LVM_FIT,
         "-c", "{I}/save_every_step_lvm.yaml"], ["runs/lvm_tiny/checkpoints/", "cannot write, read-only file system"],
         storage="ro", plant=("lvm_ckpt",)),
    # --- VQGAN stage
    Case("VQGAN test", "vqgan_test_lvm_checkpoint", "an LVM checkpoint as the VQGAN's --ckpt_path", ["test", *VQGAN,
         "--ckpt_path={A}/lvm.ckpt"], ["lvm.ckpt: an LVM checkpoint", "test needs lvm_pl.vqgan.module.VQGAN",
         "configs/lvm/"]),
    Case("VQGAN fit", "vqgan_embed_mismatch", "quantizer embed_dim != autoencoder's (raised while the model is built)",
         ["fit", *VQGAN_FIT, "--model.init_args.quantizer.init_args.embed_dim=8"],
         ["quantizer.init_args.embed_dim=8 must equal the autoencoder's embed_dim=16"]),
    Case("VQGAN fit", "vqgan_source_typo", "misspelt init arg of a nested class", ["fit", *VQGAN_FIT,
         "--data.init_args.source.init_args.splitz={train: 1}"], ["command line: data.init_args.source.init_args."
         "splitz: no such key (did you mean splits?)"]),
    Case("VQGAN fit", "vqgan_empty_folder", "image folder without images (raised in setup)", ["fit", *VQGAN_FIT, "-c",
         "{R}/data/folder.yaml", "--data.init_args.source.init_args.root={I}/empty"], ["empty"]),
    Case("VQGAN fit", "vqgan_disk_full", "disk full while saving a checkpoint", ["fit", *VQGAN_FIT, "-c",
         "{I}/save_every_step_vqgan.yaml"], ["runs/vqgan_tiny/checkpoints/", "no space left on device (needs more than",
         "bytes free"], storage="small", plant=("vqgan_ckpt",)),
    # --- tokenizing: predict with the VQGAN and configs/tokenize.yaml
    Case("tokenize", "tokenize_split_mismatch", "writer split != data split (raised in a callback's setup)",
         ["predict", *TOKENIZE, "--trainer.callbacks.init_args.split=val"],
         ["token writer: split='val' but the data predicts split 'train'"]),
    Case("tokenize", "tokenize_bad_split_name", "split name that cannot name a shard", ["predict", *TOKENIZE,
         "--trainer.callbacks.init_args.split=tr-ain"], ["token writer: split='tr-ain' must be letters"]),
    Case("tokenize", "tokenize_lvm_checkpoint", "an LVM checkpoint as the tokenizer", ["predict", *TOKENIZE,
         "--ckpt_path={A}/lvm.ckpt"], ["lvm.ckpt: an LVM checkpoint", "predict needs lvm_pl.vqgan.module.VQGAN"]),
    Case("tokenize", "tokenize_read_only", "output_dir on a read-only file system", ["predict", *TOKENIZE,
         "--trainer.callbacks.init_args.output_dir=data/tokens/more"],
         ["data/tokens/more: cannot write, read-only file system"], storage="ro", plant=("shards",)),
    Case("tokenize", "tokenize_disk_full", "disk full while writing a shard", ["predict", *TOKENIZE,
         "--trainer.callbacks.init_args.output_dir=data/tokens/more"], ["data/tokens/more/train-000000.bin: no "
         "space left on device (needs 2,592 bytes, 0 bytes free)"], storage="page", plant=("shards",)),
    # --- evaluation: test with configs/evaluate.yaml
    Case("evaluate", "eval_tokenizer_is_lvm", "an LVM checkpoint as model.tokenizer", ["test", *EVAL,
         "--data.init_args.image_size=32", "--model.init_args.tokenizer={A}/lvm.ckpt"],
         ["lvm.ckpt is not a VQGAN checkpoint"]),
    Case("evaluate", "eval_image_size_mismatch", "data.image_size the LVM was not trained on (raised in the handshake)",
         ["test", *EVAL, "--data.init_args.image_size=16", "--model.init_args.tokenizer={A}/vqgan.ckpt"],
         ["token layouts disagree: the LVM checkpoint has", "'tokens_per_image': 64", "data.image_size=16 has",
          "'tokens_per_image': 16"]),
    Case("evaluate", "eval_no_test_shards", "test token directory that does not exist", ["test", *LVM_TEST,
         "--data.init_args.test={I}/no_such_dir", "--ckpt_path={A}/lvm.ckpt"], ["no_such_dir: no token manifest here"]),
    # --- prompting: predict with configs/generate.yaml (+ prompt data configs)
    Case("prompt", "prompt_file_and_source", "prompt config given both a file and a source", ["predict", *PROMPT,
         "--data.init_args.file={A}/prompts.yaml"], ["data: give exactly one of data.file, data.folder, data.source"]),
    Case("prompt", "prompt_no_tokenizer", "no model.tokenizer (raised in predict_step)", ["predict", *NO_TOKENIZER],
         ["model.tokenizer: prompting needs the VQGAN checkpoint"]),
    Case("prompt", "prompt_unreadable_image", "prompt file naming a file that is not an image", ["predict", *PROMPT,
         "-c", "{R}/data/prompts_file.yaml", "--data.init_args.file={I}/bad_prompts.yaml"],
         ["prompt 'bad'", "not_an_image.png"]),
    Case("prompt", "prompt_tokenizer_as_checkpoint", "the tokenizer's checkpoint as the LVM's --ckpt_path", ["predict",
         *PROMPT, "--ckpt_path={A}/vqgan.ckpt"], ["vqgan.ckpt: a VQGAN tokenizer checkpoint",
         "predict needs lvm_pl.lvm.module.LVM"]),
    Case("prompt", "prompt_disk_full", "disk full while writing the PNGs", ["predict", *PROMPT,
         "--trainer.callbacks.init_args.frames=false"], ["generated/", "no space left on device (needs",
         "0 bytes free"], storage="full", plant=("png",)),
    Case("prompt", "prompt_progress_bar_conflict", "progress bar off while the config adds one (Lightning's"
         " MisconfigurationException)", ["predict", *PROMPT, "--trainer.enable_progress_bar=false"],
         ["Trainer was configured with `enable_progress_bar=False` but found `TQDMProgressBar`"]),
    # --- interop commands
    Case("export-hf", "export_hf_not_empty", "out_dir that holds an earlier export", ["export-hf",
         "--checkpoint={A}/lvm.ckpt", "--out_dir=exported"], ["out_dir=exported: exists and is not empty"]),
    Case("export-hf", "export_hf_tokenizer_checkpoint", "the tokenizer's checkpoint", ["export-hf",
         "--checkpoint={A}/vqgan.ckpt", "--out_dir=new_export"], ["checkpoint=", "a VQGAN tokenizer checkpoint",
         "export-hf needs lvm_pl.lvm.module.LVM"]),
    Case("export-hf", "export_hf_option_typo", "misspelt option", ["export-hf", "--checkpointz={A}/lvm.ckpt",
         "--out_dir=new_export"], ["command line: checkpointz: no such option (did you mean checkpoint?)"]),
    Case("export-hf", "export_hf_read_only", "out_dir on a read-only file system", ["export-hf",
         "--checkpoint={A}/lvm.ckpt", "--out_dir={cwd}/new_export"], ["new_export: cannot write, read-only file"],
         storage="ro", plant=("export",)),
    Case("import-hf", "import_hf_not_hf_dir", "hf_dir without config.json", ["import-hf", "--hf_dir={I}/empty",
         "--out=imported.ckpt"], ["hf_dir=", "empty: no config.json"]),
    Case("import-hf", "import_hf_missing_option", "required option not given", ["import-hf", "--out=imported.ckpt"],
         ["hf_dir: required"]),
    Case("convert-zero", "convert_zero_file", "a file instead of a ZeRO directory", ["convert-zero",
         "--checkpoint_dir={A}/lvm.ckpt", "--out=converted.ckpt"], ["a file, not a DeepSpeed ZeRO checkpoint"]),
]  # fmt: skip


# ---------------------------------------------------------------- the doc, generated from CASES


def render_table() -> str:
    """The markdown table docs/reliability.md holds between the errors-table markers."""
    rows = ["| stage | bad input | command | the `error:` line says |", "|---|---|---|---|"]
    for case in CASES:
        where = f" ({STORAGE[case.storage]})" if case.storage else ""
        command = " ".join(a for a in case.argv if a.endswith(".yaml") and "{R}" in a).replace("{R}", "configs")
        command = f"`{case.argv[0]}{' ' + command if command else ''}`"
        says = " ... ".join(f"`{s}`" for s in case.says)
        rows.append(f"| {case.stage} | {case.what}{where} | {command} | {says} |")
    return "\n".join(rows)


def _doc_with_table(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render_table()}\n{END}{tail}"


def test_doc_table_is_generated_from_cases():
    text = DOC.read_text()
    assert START in text and END in text, f"{DOC}: no {START} ... {END} markers"
    assert text == _doc_with_table(text), (
        f"{DOC} differs from CASES: run python tests/cli/test_reliability_cli_table.py"
    )


def test_the_table_covers_every_stage_and_command():
    stages = {case.stage.split()[0] for case in CASES}
    assert {"LVM", "VQGAN", "tokenize", "evaluate", "prompt", "export-hf", "import-hf", "convert-zero"} <= stages
    assert {"fit", "test", "predict"} <= {case.argv[0] for case in CASES}
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- running the cases


class OtherModule(BoringModel):
    """A LightningModule of neither stage that saves its hyper-parameters (so the CLI records its class)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()


def _inputs(root: Path) -> Path:
    """Bad inputs: YAMLs with mistakes, an empty and a corrupt token directory, foreign and truncated checkpoints."""
    from lightning.pytorch import Trainer

    root.mkdir()
    (root / "typo.yaml").write_text("trainer:\n  max_epochs: 1\n  max_stepz: 3\n")
    (root / "wrong_type.yaml").write_text("model:\n  init_args:\n    optim:\n      lr: fast\n")
    (root / "invalid.yaml").write_text("trainer:\n  max_steps: [1\n")
    (root / "class_typo.yaml").write_text("data:\n  class_path: datamodules.tokens.TokenDataModul\n")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "manifest.json").write_text('{"format": "lvm-pl-token-shards", "version": 1, "shards": [')
    (root / "not_an_image.png").write_text("not a PNG")
    (root / "bad_prompts.yaml").write_text("- {name: bad, images: [not_an_image.png, not_an_image.png]}\n")
    for stage in ("lvm", "vqgan"):
        (root / f"save_every_step_{stage}.yaml").write_text(
            "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: runs/{stage}_tiny/checkpoints, save_last: true, every_n_train_steps: 1}}\n"
        )
    from main import cli

    boring = "lightning.pytorch.demos.boring_classes"
    run = cli([f"--model={__name__}.OtherModule", f"--data={boring}.BoringDataModule", "--trainer.max_steps=1",
               "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={root}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"], run=False)  # fmt: skip
    run.trainer.fit(run.model, run.datamodule)
    run.trainer.save_checkpoint(root / "other_class.ckpt")  # records its class, as every CLI checkpoint does
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(root / "boring.ckpt")
    blob = (root / "boring.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    return root


def _plant(cwd: Path, assets: dict, what: tuple[str, ...], link: bool) -> None:
    """Good outputs of earlier runs where each command would write: they must come out untouched."""
    put = os.link if link else shutil.copy2
    targets = {
        "lvm_ckpt": [(assets["lvm_ckpt"], cwd / "runs/lvm_tiny/checkpoints/last.ckpt")],
        "vqgan_ckpt": [(assets["vqgan_ckpt"], cwd / "runs/vqgan_tiny/checkpoints/last.ckpt")],
        "shards": [(f, cwd / "data/tokens/train" / f.name) for f in sorted((assets["shards"] / "train").iterdir())],
        "png": [(assets["folder"] / "sentence0" / "0.png", cwd / "generated/earlier.png")],
    }
    for key in what:
        if key == "export":
            (cwd / "exported").mkdir(parents=True)
            (cwd / "exported" / "config.json").write_text('{"model_type": "llama"}\n')
            continue
        for source, target in targets[key]:
            target.parent.mkdir(parents=True, exist_ok=True)
            put(source, target)


def _planted_size(assets: dict, what: tuple[str, ...]) -> int:
    files = {"lvm_ckpt": [assets["lvm_ckpt"]], "vqgan_ckpt": [assets["vqgan_ckpt"]]}
    files["shards"] = list((assets["shards"] / "train").iterdir())
    return sum(f.stat().st_size for key in what for f in files.get(key, []))


def _fill(directory: Path) -> None:
    """Take every free byte of the file system `directory` is on."""
    with open(directory / ".filler", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * chunk):
                    pass


def _mount(cwd: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes on `cwd`; the reason when that is not possible here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(cwd)], capture_output=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.decode().strip()}"


def _hashes(root: Path, cache: dict) -> dict[str, str]:
    """sha256 of every file under `root` (by path); files already hashed with the same inode and mtime are reused."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in cache:
            cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[path.relative_to(root).as_posix()] = cache[key]
    return out


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_assets) -> dict:
    """Run every case once; returns {name: result} with rc, stderr, files before and after, or a skip reason."""
    root = tmp_path_factory.mktemp("cli_table")
    inputs = _inputs(root / "inputs")
    assets_root = tiny_assets["folder"].parent
    commands, runnable, results, mounts, cache = [], [], {}, [], {}
    for case in CASES:
        cwd, logs = root / "cases" / case.name, root / "logs" / case.name
        cwd.mkdir(parents=True)
        logs.mkdir(parents=True)
        if case.storage:
            reason = _mount(cwd, _planted_size(tiny_assets, case.plant) + (1 << 20))
            if reason:
                results[case.name] = {"skip": reason}
                continue
            mounts.append(cwd)
        _plant(cwd, tiny_assets, case.plant, link=not case.storage)
        if case.storage in ("full", "page"):
            _fill(cwd)
        if case.storage == "page":  # room for a claim file, none for a shard or the manifest
            os.truncate(cwd / ".filler", (cwd / ".filler").stat().st_size - 4096)
        if case.storage == "ro":
            subprocess.run(["mount", "-o", "remount,ro", str(cwd)], check=True)
        values = {"R": str(REPO / "configs"), "A": str(assets_root), "I": str(inputs), "cwd": str(cwd),
                  "logs": str(logs)}  # fmt: skip
        argv = [a.format(**values) if "{" in a and "{train" not in a else a for a in case.argv]
        env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        commands.append({"argv": argv, "cwd": str(cwd), "env": env})
        runnable.append(case)
        results[case.name] = {"before": _hashes(cwd, cache)}
    for flag, debug_env in ((["--debug"], {}), ([], {"LVM_PL_DEBUG": "1"})):
        argv = ["fit", *flag, "-c", str(REPO / "configs/lvm/tiny.yaml"), "-c", str(inputs / "typo.yaml")]
        commands.append({"argv": argv, "cwd": str(root), "env": {**commands[0]["env"], **debug_env}})
    start = time.perf_counter()
    try:
        done = run_commands(commands, parallel=PARALLEL)
        results |= {"debug_flag": done[-2], "debug_env": done[-1]}
        for case, result in zip(runnable, done[:-2], strict=True):
            results[case.name] |= result | {"after": _hashes(root / "cases" / case.name, cache)}
    finally:
        for cwd in mounts:
            subprocess.run(["umount", str(cwd)], check=False)
    print(f"\n{len(runnable)} CLI cases in {time.perf_counter() - start:.1f} s ({PARALLEL} at a time)")
    return results


def _check(case: Case, result: dict) -> str | None:
    """What is wrong with one case's run, or None."""
    err = result["stderr"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if result["rc"] != 2 or "Traceback" in err or len(errors) != 1 or "args parameter is intended" in err:
        return f"rc={result['rc']}, {len(errors)} error: lines\n{err[-2500:]}"
    position = 0
    for fragment in case.says:
        position = errors[0].find(fragment, position)
        if position < 0:
            return f"the error line lacks {fragment!r}:\n{errors[0]}"
    if result["before"] != result["after"]:
        before, after = result["before"], result["after"]
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        return f"files new or changed: {changed}"
    return None


def _assert_cases(table: dict, storage: bool) -> None:
    cases = [c for c in CASES if bool(c.storage) == storage]
    skipped = [table[c.name]["skip"] for c in cases if "skip" in table[c.name]]
    if skipped:
        pytest.skip(skipped[0])
    failures = {c.name: why for c in cases if (why := _check(c, table[c.name]))}
    assert not failures, "\n\n".join(f"{name}: {why}" for name, why in failures.items())


@pytest.mark.slow  # ~36 commands: one warm process (~10 s of imports), then ~1-3 s a command, 3 at a time
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(table):
    _assert_cases(table, storage=False)


@pytest.mark.slow
def test_full_and_read_only_storage_is_named_and_nothing_written(table):
    _assert_cases(table, storage=True)


@pytest.mark.slow
def test_debug_shows_the_full_traceback(table):
    """`--debug` or LVM_PL_DEBUG=1: the same mistake keeps jsonargparse's exception and its traceback."""
    for name in ("debug_flag", "debug_env"):
        result = table[name]
        assert result["rc"] == 1 and "Traceback (most recent call last)" in result["stderr"], result["stderr"][-2000:]
        assert "ArgumentError" in result["stderr"] and "max_stepz" in result["stderr"]


def test_the_checks_catch_a_traceback_and_a_written_file():
    """The table's checks fail on the outcomes they must catch."""
    case = CASES[0]
    good = {"rc": 2, "stderr": f"error: {case.says[0]}\n", "before": {"a": "1"}, "after": {"a": "1"}}
    assert _check(case, good) is None
    assert "rc=1" in _check(case, good | {"rc": 1, "stderr": "Traceback (most recent call last):\n"})
    assert "new or changed" in _check(case, good | {"after": {"a": "1", "b": "2"}})
    assert "lacks" in _check(case, good | {"stderr": "error: something else\n"})


if __name__ == "__main__":
    DOC.write_text(_doc_with_table(DOC.read_text()))
    print(f"wrote the table of {len(CASES)} cases into {DOC}")
