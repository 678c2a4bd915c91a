"""Turn whatever a command raised into the one `error:` line a user can act on, or None for a bug.

User mistakes surface wrapped: jsonargparse re-raises an error of a constructor as "Does not validate against any of
the Union subtypes" (the original as its cause), and reports config mistakes as text. This module unwraps the first,
and rewrites the second as `<file>:<line>: <key>: <problem> (did you mean ...?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
from argparse import ArgumentError
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lvm_pl.atomic import storage_fault
from lvm_pl.console import UserError
from lvm_pl.finite import NonFiniteLossError

# the top-level keys of a Trainer command (LightningCLI's subcommand parser)
TRAINER_KEYS = ("config", "seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path")
GROUP_FLAGS = ("--model", "--data", "--trainer", "--optimizer", "--lr_scheduler")


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from (`raise ... from`, as jsonargparse wraps), each once. Not the exceptions it
    was raised while handling: a bug in an `except UserError:` block must stay a bug."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__


def user_message(err: BaseException, argv: list[str], command: Callable | None = None) -> str | None:
    """The one line for `err` (without `error: `), or None when it is a bug. `command`: the non-Trainer command's
    function, whose signature lists the valid options."""
    chain = list(_causes(err))
    for e in chain:
        if isinstance(e, (UserError, NonFiniteLossError)):
            return _worker_message(str(e))
    for e in chain:
        if isinstance(e, MisconfigurationException):  # Lightning's word for a contradictory Trainer config
            return " ".join(str(e).split())
    for e in chain:  # storage_fault itself looks into the context too: torch's writer raises while handling ENOSPC
        if isinstance(e, Exception) and (fault := storage_fault(e, getattr(e, "filename", None) or "an output")):
            known = getattr(e, "filename", None)
            return str(fault) if known else f"{fault} (the file is not known; --debug shows the writer)"
    for e in chain:
        if isinstance(e, ArgumentError):
            return explain_argument_error(str(e.message), argv, command)
    return None


def _worker_message(text: str) -> str:
    """A DataLoader worker's error comes as "Caught X in DataLoader worker..." and its traceback: keep the message."""
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if re.match(r"[\w.]+: ", last) else last


def explain_argument_error(message: str, argv: list[str], command: Callable | None = None) -> str:
    """jsonargparse's parse error -> `<where>: <key>: <problem>[ (did you mean ...?)]` on one line."""
    if message.startswith("Problems parsing config"):
        return _invalid_yaml(argv) or " ".join(message.split())
    if found := re.match(r"unrecognized arguments: (\S+)", message):
        key = found[1].lstrip("-").split("=")[0]
        return _line(key, "no such option", argv, _options(key, message, command))
    if found := re.search(r"does not accept option '([^']+)'", message):
        return _line(found[1], "no such key", argv, _options(found[1], message, command))
    if found := re.match(r'Key "([^"]+)" is required|the following arguments are required: ([^,\s]+)', message):
        return _line(found[1] or found[2], "required, but not given", argv, [])
    path, classes = _nesting(message)
    if found := re.search(r"Option '([^']+)' is not accepted", message):
        key = ".".join([*path, found[1].split(".")[0]])  # a mapping value reports its first key too
        names = _parameters(classes[-1]) if classes else []
        return _line(key, "no such key", argv, names)
    found = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if found and ("has no attribute" in found[2] or "No module named" in found[2]):
        key = ".".join([*path[:-1], "class_path"])  # path ends with the init_args of the bad class
        return _line(key, f"no class {found[1]!r}", argv, _class_paths(found[1]))
    if found := re.search(r"Expected a (.+?)\. Got value: (.*)", message):
        return _line(".".join(path), f"expected {_type_name(found[1])}, got {found[2].strip()!r}", argv, [])
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines[:3])


def _invalid_yaml(argv: list[str]) -> str | None:
    """`<file>:<line>: not valid YAML (<problem>)` for the first config file in `argv` that does not parse."""
    for _, path in _config_files(argv):
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            return f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})"
    return None


def _nesting(message: str) -> tuple[list[str], list[str]]:
    """The key path (`init_args` levels included) and the class paths that jsonargparse's nested message walks."""
    path, classes = [], []
    for line in message.splitlines():
        if found := re.match(r'\s*(?:error: )?Parser key "([^"]+)":', line):
            path += found[1].split(".")
        elif found := re.match(r"\s*(?:- )?Problem with given class_path '([^']+)':", line):
            classes.append(found[1])
            if not dataclasses.is_dataclass(_child_path(found[1])):  # a settings dataclass takes its fields directly
                path.append("init_args")
        elif line.strip().startswith("- Expected a <class 'NoneType'>"):
            break  # the other Union member: noise
    return path, classes


def _line(key: str, problem: str, argv: list[str], candidates: list[str]) -> str:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, [c for c in candidates if c != leaf], n=3, cutoff=0.6)
    if "class_path" in key:
        close = candidates[:3]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{locate(key, argv)}: {key}: {problem}{hint}"


def _options(key: str, message: str, command: Callable | None) -> list[str]:
    """Valid names at the level of `key`: the command's parameters, the Trainer's, or a command's top-level keys."""
    if command is not None:
        return list(inspect.signature(command).parameters)
    parts = key.split(".")
    if parts[0] == "trainer" and len(parts) == 2:
        from lightning.pytorch import Trainer

        return list(inspect.signature(Trainer.__init__).parameters)
    return list(TRAINER_KEYS) if len(parts) == 1 else []


def _parameters(class_path: str) -> list[str]:
    try:
        module, name = class_path.rsplit(".", 1)
        return [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _class_paths(class_path: str) -> list[str]:
    """The closest existing dotted path to a mistyped one (the first part that does not exist, fixed), if any."""
    parts, obj, good = class_path.split("."), None, []
    for j, part in enumerate(parts):
        child = _child(obj, good, part)
        if child is None:
            close = difflib.get_close_matches(part, _children(obj), n=1, cutoff=0.5)
            fixed = ".".join([*good, *close, *parts[j + 1 :]])
            return [fixed] if close and _child_path(fixed) is not None else []
        obj, good = child, [*good, part]
    return []


def _child(obj: object, good: list[str], part: str) -> object | None:
    if obj is not None and hasattr(obj, part):
        return getattr(obj, part)
    try:
        return importlib.import_module(".".join([*good, part]))
    except ImportError:
        return None


def _children(obj: object) -> list[str]:
    if obj is None:
        return [m.name for m in pkgutil.iter_modules()]
    names = [n for n in dir(obj) if not n.startswith("_")]
    return names + [m.name for m in pkgutil.iter_modules(getattr(obj, "__path__", []))]


def _child_path(dotted: str) -> object | None:
    obj, good = None, []
    for part in dotted.split("."):
        obj = _child(obj, good, part)
        if obj is None:
            return None
        good.append(part)
    return obj


def _type_name(text: str) -> str:
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)


def locate(key: str, argv: list[str]) -> str:
    """Where `key` was set: `<file>:<line>` of the last config file in `argv` that sets it, or the command line."""
    want = [p for p in key.split(".") if p != "init_args"]
    flags = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")]
    if any([p for p in flag.split(".") if p != "init_args"] == want for flag in flags):
        return "command line"
    for prefix, path in reversed(_config_files(argv)):
        line = _find_line(path, want, prefix)
        if line is not None:
            return f"{path}:{line}"
    return "command line"


def _config_files(argv: list[str]) -> list[tuple[list[str], Path]]:
    """(key prefix, file) for every config file `argv` gives (`-c f`, `--config=f`, `--model f`, ...), in order."""
    found = []
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if flag in ("-c", "--config"):
            found.append(([], Path(value)))
        elif flag in GROUP_FLAGS and value.endswith((".yaml", ".yml", ".json")):
            found.append(([flag.lstrip("-")], Path(value)))
    return [(prefix, path) for prefix, path in found if path.is_file()]


def _find_line(path: Path, want: list[str], prefix: list[str]) -> int | None:
    try:
        root = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    for keys, line in _walk(root, prefix):
        if keys == want:
            return line
    return None


def _walk(node, path: list[str]) -> Iterator[tuple[list[str], int]]:
    """(key path without `init_args` levels, 1-based line) of every mapping key under `node`."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = str(key.value)
            keys = path if name == "init_args" else [*path, name]
            if name != "init_args":
                yield keys, key.start_mark.line + 1
            yield from _walk(value, keys)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _walk(item, path)
