"""Configs as deltas: every size/architecture config, composed as its `Usage:` line says (recipe + delta + strategy +
data), resolves to exactly what the standalone config of before the redesign did, apart from the renamed keys
(tests/fixtures/print_config/, written by `--print_config` at commit 922f1b3)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest
import yaml

from lvm_pl.lvm.config import LVMConfig
from lvm_pl.lvm.module import RENAMED, migrate_hparams
from main import cli

OLD_FUNCTIONS = {"lvm_pl.lvm.module.batch_size": "lvm_pl.batches.batch_size"}
OLD_FUNCTIONS["lvm_pl.lvm.module.batch_tokens"] = "lvm_pl.batches.batch_tokens"
SIZES = ["100m", "300m", "600m", "1b", "3b", "7b", "3b_offload", "7b_offload"]
CASES = [f"lvm/{s}" for s in SIZES] + ["vqgan/maskgit_f16_8192", "vqgan/muse_f16_8192"]


def usage(path) -> list[str]:
    """The `-c` files of a config's `# Usage:` line, in their order."""
    line = next(x for x in path.read_text().splitlines() if x.startswith("# Usage: python main.py fit"))
    words = shlex.split(line.removeprefix("# Usage: python main.py fit"))
    return [words[i + 1] for i, w in enumerate(words) if w == "-c"]


def resolved(repo_root, configs: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli(["fit", *[a for c in configs for a in ("-c", str(repo_root / c))], "--print_config"])
    # DeepSpeed's import logs a line to stdout ("[2026-... [WARNING] ...")
    return yaml.safe_load("\n".join(x for x in out.getvalue().splitlines() if not x.startswith("[20")))


def today(old: dict) -> dict:
    """An old resolved config in today's keys: LVM arguments moved to their groups, functions moved."""
    model = old["model"]["init_args"]
    if old["model"]["class_path"].endswith(".LVM"):
        model = migrate_hparams(model)
        model.pop("generation", None)  # run-time settings, unchanged; compared below with their new defaults
        # added since: the recipe names the document-masked attention (the code default then and now)
        model["overrides"] = {**(model.get("overrides") or {}), "doc_mask": True}
        old["model"]["init_args"] = model
        # changed since: the data's windows follow the model's block_size, which is what the old file set
        window = LVMConfig.from_name(model["preset"], **model["overrides"]).block_size
        assert old["data"]["init_args"]["seq_len"] == window
        old["data"]["init_args"]["seq_len"] = None
    else:  # added since: the tokenizer's pixel range (its default, [-1, 1], is what the old code fed)
        model["input_range"] = [-1.0, 1.0]
    old["data"]["init_args"].pop("vocab_size", None)
    for cb in old["trainer"].get("callbacks") or []:
        for key, value in cb.get("init_args", {}).items():
            cb["init_args"][key] = OLD_FUNCTIONS.get(value, value) if isinstance(value, str) else value
    return old


@pytest.mark.parametrize("case", CASES)
def test_delta_resolves_as_the_standalone_config_did(repo_root, case):
    configs = usage(repo_root / "configs" / f"{case}.yaml")
    if "vqgan/" in case:  # the old tokenizer files named no strategy (their usage composed one, as today's do)
        configs = [c for c in configs if not c.startswith("configs/trainer/")]
    new = resolved(repo_root, configs)
    old = today(
        yaml.safe_load((repo_root / "tests/fixtures/print_config" / f"{case.replace('/', '_')}.yaml").read_text())
    )
    if "lvm/" in case:
        new["model"]["init_args"].pop("generation", None)
        assert new["model"]["init_args"].pop("evaluation") == old["model"]["init_args"].pop("evaluation")
    assert new == old


def test_sizes_are_short_deltas(repo_root):
    for case in CASES:
        body = [x for x in (repo_root / "configs" / f"{case}.yaml").read_text().splitlines() if not x.startswith("#")]
        assert len(body) <= 20, f"configs/{case}.yaml: {len(body)} lines; a size is a delta over its recipe"
        assert "strategy" not in "\n".join(body), f"configs/{case}.yaml: strategies live in configs/trainer/"


def test_every_renamed_argument_names_where_it_went():
    assert set(RENAMED) >= {"model", "model_overrides", "vocab_size", "lr", "context_frames"}
    assert all(new is None or re.fullmatch(r"[a-z_.]+", new) for new in RENAMED.values())
