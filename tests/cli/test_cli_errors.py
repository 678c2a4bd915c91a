"""`lvm_pl/cli_errors.py` on the exceptions it meets: wrapped user errors, storage faults, bugs, config files."""

from __future__ import annotations

import errno

from torch._utils import ExceptionWrapper

from lvm_pl.cli_errors import locate, user_message
from lvm_pl.console import UserError


def _raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_a_user_error_is_found_under_the_wrappers():
    try:
        try:
            raise UserError("data.file=x.yaml: cannot read")
        except UserError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert user_message(outer, []) == "data.file=x.yaml: cannot read"


def test_a_dataloader_workers_user_error_keeps_only_its_message():
    """torch re-raises a worker's exception with the worker's traceback in the message; the line drops it."""
    try:
        raise UserError("shard x.bin: truncated")
    except UserError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except UserError as err:
        assert "Traceback" in str(err)
        assert user_message(err, []) == "shard x.bin: truncated"


def test_storage_faults_are_named_and_bugs_are_not_user_errors(tmp_path):
    read_only = _raised(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs")))
    assert user_message(read_only, []) == f"{tmp_path / 'runs'}: cannot write, read-only file system; choose a " \
        "writable output location"  # fmt: skip
    assert user_message(_raised(OSError(errno.EIO, "I/O error", "x")), []) is None
    assert user_message(_raised(KeyError("image")), []) is None


def test_locate_names_the_last_file_and_line_that_set_a_key(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  init_args:\n    lr: 1\n")
    second.write_text("trainer: {max_steps: 2}\nmodel:\n  class_path: x.Y\n  init_args:\n\n    lr: 2\n")
    argv = ["fit", "-c", str(first), f"--config={second}"]
    assert locate("model.init_args.lr", argv) == f"{second}:6"
    assert locate("trainer.max_steps", argv) == f"{second}:1"
    assert locate("model.init_args.lr", [*argv, "--model.init_args.lr=3"]) == "command line"
    sub = tmp_path / "model.yaml"
    sub.write_text("init_args:\n  warmup: 3\n")
    assert locate("model.init_args.warmup", ["fit", "--model", str(sub)]) == f"{sub}:2"


def test_a_bug_while_handling_a_user_error_stays_a_bug():
    try:
        try:
            raise UserError("x: bad")
        except UserError:
            {}["image"]  # a bug in the handler
    except KeyError as bug:
        assert user_message(bug, []) is None
