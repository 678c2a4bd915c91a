"""`make bench`: run every bench/bench_*.py as a subprocess, then print one table and write bench/results/summary.json.

python -m bench [--quick] [--only lvm_train vqgan] [--flags lvm_train="--preset 300m --contexts 4096"]

Each script writes `bench/results/<script>.json` in the common schema (`bench/common.py`); a script that fails or
writes no fresh results shows as such in the table and makes the exit code 1. Missed aims never change the exit code:
benchmarks report, they do not gate.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from typing import Any

from bench.common import RESULTS_DIR, ROOT, figure, header
from lvm_pl.atomic import write_json
from lvm_pl.console import UserError, say

COLUMNS = ("figure", "ours", "reference", "ratio", "aim", "met?")


def discover() -> list[str]:
    """Names (file stems) of the benchmark scripts, in a stable order."""
    return sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def _stem(name: str) -> str:
    return name if name.startswith("bench_") else f"bench_{name}"


def parse_flags(pairs: list[str], scripts: list[str]) -> dict[str, list[str]]:
    """`NAME="--a 1 --b"` pairs -> extra arguments per script stem."""
    extra: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, flags = pair.partition("=")
        if not sep or _stem(name) not in scripts:
            raise UserError(f"--flags {pair!r}: expected NAME=FLAGS with NAME one of {scripts}")
        extra[_stem(name)] = shlex.split(flags)
    return extra


def run_script(stem: str, args: list[str]) -> dict[str, Any]:
    """Run one script as `python -m bench.<stem>`; return its status and, when it wrote fresh results, its figures."""
    path = RESULTS_DIR / f"{stem}.json"
    start = time.time()
    cmd = [sys.executable, "-m", f"bench.{stem}", *args]
    say(f"running {' '.join(cmd[1:])}")
    code = subprocess.run(cmd, cwd=ROOT).returncode
    seconds = time.time() - start
    status = {"script": stem, "args": args, "exit_code": code, "seconds": seconds, "figures": []}
    if code != 0:
        status["error"] = f"exit code {code}"
    elif not path.exists() or path.stat().st_mtime < start:
        status["error"] = f"wrote no fresh {path}"
    else:
        results = json.loads(path.read_text())
        status["figures"] = results.get("figures", [])
        if not status["figures"]:
            status["error"] = f"{path} has no 'figures' list (see bench/common.py)"
    return status


def row(fig: dict[str, Any]) -> dict[str, Any]:
    """A figure with its ratio (ours / reference) and whether its aim was met (None where it has no aim)."""
    fig = {**figure(fig["name"], fig["unit"], fig.get("ours")), **fig}  # optional keys filled in
    ours, ref = fig["ours"], fig["reference"]
    ratio = ours / ref if ours is not None and ref else None
    met = None  # no aim, or our side not measured (yet)
    if ours is not None and fig["aim_ratio"] is not None:
        met = ratio is not None and ratio >= fig["aim_ratio"]
    elif ours is not None and fig["aim_min"] is not None:
        met = ours >= fig["aim_min"]
    return {**fig, "ratio": ratio, "met": met}


def _value(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "fraction":
        return f"{x:.1%}"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix} {unit}"
    return f"{x:.3g} {unit}"


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of the rows (also valid as a Markdown table, for docs/benchmarks.md)."""
    cells = []
    for r in rows:
        if r["aim_ratio"] is not None:
            aim = f">= {r['aim_ratio']:g}x"
        elif r["aim_min"] is not None:
            aim = f">= {_value(r['aim_min'], r['unit'])}"
        else:
            aim = "-"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        cells.append((r["name"], _value(r["ours"], r["unit"]), _value(r["reference"], r["unit"]), ratio, aim, met))
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    line = lambda c: "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |"
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, cells)])


def main(argv: list[str] | None = None) -> int:
    scripts = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (seconds each)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"subset of {scripts}")
    parser.add_argument("--flags", nargs="+", default=[], metavar='NAME="FLAGS"', help="extra flags for one script")
    args = parser.parse_args(argv)
    try:
        chosen = scripts if args.only is None else [_stem(n) for n in args.only]
        unknown = sorted(set(chosen) - set(scripts))
        if unknown:
            raise UserError(f"--only {unknown}: no such benchmark; choose from {scripts}")
        extra = parse_flags(args.flags, scripts)
    except UserError as err:
        parser.error(str(err))  # one line and exit code 2, as main.py does for user mistakes
    statuses = [run_script(s, (["--quick"] if args.quick else []) + extra.get(s, [])) for s in chosen]
    rows = [row(f) for st in statuses for f in st["figures"]]
    head = header()
    machine = head["machine"]
    say(
        f"{head['date_utc']} UTC, {machine['processor']} x{machine['cpu_count']} (torch threads "
        f"{machine['torch_threads']}), GPU {machine['gpu'] or 'none'}, torch {head['versions']['torch']}"
    )
    say("\n" + table(rows))
    failed = [st for st in statuses if "error" in st]
    for st in failed:
        say(f"{st['script']}: {st['error']}")
    write_json(RESULTS_DIR / "summary.json", {"header": head, "quick": args.quick, "rows": rows, "scripts": statuses})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
