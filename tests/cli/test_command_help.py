"""`python main.py <command> --help` describes every argument of every non-Trainer command (main.py's COMMANDS)."""

from __future__ import annotations

import re

import pytest

from main import COMMANDS

OPTION = re.compile(r"^  (-\S+)")  # an argument's first help line: two spaces, then the option
# jsonargparse's own suffix, present with or without a description: `(required, type: str)`, `(type: int, default: 1)`
TYPE_NOTE = re.compile(r"\((required, )?type: .*?(, default: .*?)?\)\s*$", re.S)


def undescribed(help_text: str) -> list[str]:
    """The options of a `--help` text whose help is only jsonargparse's type note (or nothing)."""
    blocks: list[list[str]] = []
    for line in help_text[help_text.find("\n\n") :].splitlines():  # after the usage lines
        if OPTION.match(line):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    missing = []
    for block in blocks:
        # the option spec ends at the first run of two spaces on the first line; the rest is help text
        first, *rest = block
        spec, _, text = first.strip().partition("  ")
        words = TYPE_NOTE.sub("", " ".join([text.strip(), *(line.strip() for line in rest)])).strip()
        if not words:
            missing.append(spec.split(",")[0].split()[0])
    return missing


def test_the_parser_finds_an_undescribed_option():
    lines = [
        "usage: x",
        "",
        "options:",
        "  -h, --help            Show this help.",
        "  --out OUT             (required, type: str)",
        "  --hf_dir HF_DIR",
        "                        (required, type: str)",
        "  --n N                 the count. (type: int, default: 1)",
    ]
    text = "\n".join(lines)
    assert undescribed(text) == ["--out", "--hf_dir"]


# convert-zero's help imports DeepSpeed (~15 s on 2 cores): out of the inner loop
SLOW_HELP = {"convert-zero"}


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_HELP else c for c in sorted(COMMANDS)]
)
def test_every_argument_has_help_text(command, main_py):
    run = main_py([command, "--help"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert undescribed(run.stdout) == [], run.stdout
    for group in re.findall(r"^  --(\S+)\.help\s+Show the help for", run.stdout, re.M):  # nested settings classes
        nested = main_py([command, f"--{group}.help"])
        assert nested.returncode == 0, nested.stderr[-2000:]
        assert undescribed(nested.stdout) == [], nested.stdout
