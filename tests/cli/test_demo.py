"""The demo's commands stay valid CLI commands, and its summary reads the results files the stages write."""

import shlex
import subprocess
import sys

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


ALL_STAGES = {f"{v.name}-{s.name}": s for v in (demo.DEFAULT, demo.LONG) for s in demo.stages(v)}


def trainer_words(args: str) -> list[str]:
    """A stage's words; `tokenize`'s as the predict it runs per split (its configs, then configs/tokenize.yaml)."""
    words = shlex.split(args)
    if words[0] != "tokenize":
        return words
    configs = [a for i, w in enumerate(words) if w == "-c" for a in ("-c", words[i + 1])]
    return ["predict", *configs, "-c", "configs/tokenize.yaml"]


@pytest.mark.parametrize("stage", ALL_STAGES.values(), ids=ALL_STAGES.keys())
def test_every_stage_is_a_valid_command(stage, in_repo_layout, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([*trainer_words(stage.args), "--print_config"])
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


def test_the_long_variant_keeps_its_own_runs_and_shards():
    long, default = demo.stages(demo.LONG), demo.stages(demo.DEFAULT)
    assert [s.name for s in long] == [s.name for s in default]
    for stage in long:
        assert "runs/vqgan_tiny/" not in stage.args and "runs/lvm_tiny/" not in stage.args
        assert "data/tokens/" not in stage.args


@pytest.mark.parametrize("variant", [demo.DEFAULT, demo.LONG], ids=lambda v: v.name)
def test_the_lvm_trains_on_the_shards_its_variant_writes(variant, in_repo_layout, capsys):
    (fit,) = [s for s in demo.stages(variant) if s.name == "lvm_fit"]
    with pytest.raises(SystemExit):
        cli([*shlex.split(fit.args), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert (data["train"], data["val"]) == (f"{variant.tokens}/train", f"{variant.tokens}/val")


def test_summary_states_the_quality_bar_with_its_figures(in_repo_layout):
    lvm = {"next_frame": {"sequence": {"predicted_psnr": 19.0, "copy_last_psnr": 17.5, "reconstruction_psnr": 23.0}}}
    rows = [{"context_frames": 1, "perplexity": 10.0}, {"context_frames": 2, "perplexity": 9.0}]
    assert "beat copy-the-last-frame: yes (19.00 vs 17.50 dB)" in demo.verdict(lvm, rows)[0]
    worse = {"next_frame": {"sequence": {**lvm["next_frame"]["sequence"], "predicted_psnr": 16.0}}}
    lines = demo.verdict(worse, rows)
    assert "NO (16.00 vs 17.50 dB)" in lines[0] and "falls with context: yes (10.00 -> 9.00)" in lines[0]
    assert "--long true" in lines[1]  # the default run points at the long one
    assert "--long true" not in demo.verdict(worse, rows, demo.LONG)[1]


def test_the_readme_shows_the_commands_the_demo_runs(repo_root):
    text = (repo_root / "README.md").read_text().replace("\\\n", " ")
    shown = " ".join(" ".join(line.split()) for line in text.splitlines() if line.startswith("python main.py"))
    for stage in demo.STAGES:
        assert f"python main.py {' '.join(stage.args.split())}" in shown, stage.name


def test_summary_shows_what_was_drawn_beside_the_copy_baseline():
    moving = {"examples": 4, "predicted_position_error": 1.5, "copy_last_position_error": 3.25}
    moving |= {"predicted_present": 0.75, "copy_last_present": 1.0, "predicted_token_accuracy": 0.8}
    moving |= {"reconstruction_position_error": 0.5, "reconstruction_present": 1.0}
    edges = {"examples": 2, "predicted_psnr": 14.0, "copy_last_psnr": 11.0, "copy_last_token_accuracy": 0.01}
    lines = demo.drawn({"sequence": {}, "family/moving": moving, "family/edges": edges})
    assert lines[0].startswith(
        "moving      : object position error 1.50 px (copy 3.25 px, tokenizer 0.50 px), presence 75%"
        " (copy 100%, tokenizer 100%)"
    )
    assert "token accuracy 0.80 (copy n/a)" in lines[0]
    assert lines[1] == "edges       : psnr 14.00 dB (copy 11.00 dB), token accuracy n/a (copy 0.01) (2 prompts)"


def test_stage_processes_ignore_only_lightnings_worker_advice():
    module = "lightning.pytorch.trainer.connectors.data_connector"
    messages = ["The 'val_dataloader' does not have many workers which may be a bottleneck.", "another warning"]
    warn = f"warnings.warn_explicit(m, UserWarning, 'd.py', 1, module={module!r})"
    code = f"import warnings\nfor m in {messages!r}:\n    {warn}"
    shown = subprocess.run([sys.executable, "-c", code], env=demo.stage_env(), capture_output=True, text=True).stderr
    assert "another warning" in shown and "does not have many workers" not in shown
