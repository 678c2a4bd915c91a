"""The demo's commands stay valid CLI commands, and its summary reads the results files the stages write."""

import shlex

import pytest
import yaml

from lvm_pl import demo
from lvm_pl.console import UserError
from main import cli


@pytest.fixture
def in_repo_layout(repo_root, tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(repo_root / "configs")
    (tmp_path / "main.py").symlink_to(repo_root / "main.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("stage", demo.STAGES, ids=lambda s: s.name)
def test_every_stage_is_a_valid_command(stage, in_repo_layout, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([*shlex.split(stage.args), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("# lightning") if "# lightning" in out else 0 :])
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def test_unknown_stage_is_a_user_error(in_repo_layout):
    with pytest.raises(UserError, match="unknown stages"):
        demo.demo(only=["nope"])


def test_finished_stage_is_skipped(in_repo_layout, capsys):
    marker = in_repo_layout / "runs" / "demo" / "vqgan_fit.done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text('{"seconds": 1}')
    assert demo.run_stage(demo.STAGES[0], marker.parent) == 0.0
    assert "skipped" in capsys.readouterr().out


def test_fmt_finds_keys_at_any_depth():
    results = {"target_perplexity": {"all": {"perplexity": 12.5}}, "psnr": 21.25, "notes": ["x"]}
    assert demo.fmt(results, ("psnr", "perplexity", "missing")) == "psnr=21.25, perplexity=12.5"
    assert demo.fmt({}, ("psnr",)) == "(not available)"
