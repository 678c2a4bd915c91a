"""Run many `python main.py ...` commands fast: one process pays the imports (~10 s on 2 cores), then forks a child
per command that runs `main.py` as `__main__` with that command's argv, cwd and environment, exactly as
`python main.py ...` does after its imports. Two client sides:

- `run_commands(commands, parallel)`: a batch, `parallel` at a time
  (`python tests/cli_runner.py N < requests.jsonl`: {"argv", "cwd", "env", "stdout", "stderr"} per line ->
  one {"index", "rc", "seconds"} line per request on stdout, in order of completion);
- `WarmCLI`: one server kept for the whole test session (the `main_py` fixture of tests/conftest.py), answering one
  command at a time as a test asks (`python tests/cli_runner.py --stream`); `start` runs one in the background
  (its pid, e.g. for a test to SIGKILL it) and `wait` collects it. A request with a `module` runs
  `python -m module argv` instead (the benchmarks' quick runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# imported once in the server, so the children start warm: the modules every command's configs name
PRELOAD = [
    "main",
    "lvm_pl.lvm.module",
    "lvm_pl.vqgan.module",
    "datamodules",
    "datamodules.tokens",
    "datamodules.prompts",
    "datamodules.make_shards",
    "callbacks.token_writer",
    "callbacks.image_writer",
    "lightning.pytorch.loggers",
]
# parsed once (`--print_config`, output dropped) in the server: jsonargparse caches each class's signature, so a child
# parses its command in a quarter of the time (measured: 9.4 s cold, 1.9 s warm under load)
WARM_PARSES = [
    "fit -c configs/vqgan/tiny.yaml -c configs/data/builtin.yaml",
    "fit -c configs/lvm/recipe.yaml -c configs/trainer/deepspeed_zero2.yaml -c configs/data/tokens.yaml",
    "predict -c configs/generate.yaml",
]


def _child(request: dict) -> None:
    """In the forked child: become `python main.py <argv>` (never returns)."""
    import runpy
    import traceback

    code = 1
    try:
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # as `python main.py` with this environment would: its PYTHONPATH entries first on the path
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = extra
        module = request.get("module")
        try:
            if module:  # `python -m module argv`: the current directory first on the path, argv[0] the module's file
                sys.path.insert(0, os.getcwd())
                sys.argv = [module, *request["argv"]]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [str(REPO / "main.py"), *request["argv"]]
                runpy.run_path(str(REPO / "main.py"), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def warm_up() -> None:
    """Import what the commands use and fill jsonargparse's caches, before any child is forked."""
    import contextlib
    import importlib
    import io

    for name in PRELOAD:
        importlib.import_module(name)
    from main import main

    cwd, argv = os.getcwd(), sys.argv
    os.chdir(REPO)
    try:
        for command in WARM_PARSES:
            sys.argv = ["main.py", *command.split(), "--print_config"]  # as LightningCLI expects to find them
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main(sys.argv[1:])
    finally:
        os.chdir(cwd)
        sys.argv = argv


def serve(parallel: int) -> None:
    """Read every request from stdin, then run them `parallel` at a time; report each as it finishes."""
    warm_up()
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    running: dict[int, tuple[int, float]] = {}
    pending = list(enumerate(requests))
    while pending or running:
        while pending and len(running) < parallel:
            index, request = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running[pid] = (index, time.perf_counter())
        pid, status = os.wait()
        index, start = running.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"index": index, "rc": rc, "seconds": time.perf_counter() - start}), flush=True)


def run_commands(commands: list[dict], parallel: int = 2, timeout: float = 600) -> list[dict]:
    """Run `commands` ({"argv", "cwd", "env"}) through the server; returns {"rc", "stdout", "stderr", "seconds"}."""
    logs = Path(tempfile.mkdtemp(prefix="cli_runner_"))  # outside every command's cwd: they must stay unchanged
    requests = [
        {**command, "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err")}
        for i, command in enumerate(commands)
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(parallel)],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: list[dict] = [{} for _ in requests]
    for line in proc.stdout.splitlines():
        reply = json.loads(line)
        request = requests[reply["index"]]
        outputs = {key: Path(request[key]).read_text() for key in ("stdout", "stderr")}
        results[reply["index"]] = {"rc": reply["rc"], "seconds": reply["seconds"], **outputs}
    shutil.rmtree(logs)
    return results


def serve_stream() -> None:
    """Answer requests one by one as they arrive on stdin, until it closes: fork, wait, reply. A request with
    `detach` is answered with the child's pid at once; `{"wait": pid}` waits for such a child and replies its rc."""
    warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        start = time.perf_counter()
        if "wait" in request:
            pid = request["wait"]
        else:
            pid = os.fork()
            if pid == 0:
                _child(request)
            if request.get("detach"):
                print(json.dumps({"pid": pid}), flush=True)
                continue
        _, status = os.waitpid(pid, 0)
        reply = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}
        print(json.dumps(reply), flush=True)


@dataclass
class Started:
    """A command sent to the warm server: its argv, where its output goes, its pid once started in the background."""

    argv: list[str]
    out: Path
    err: Path
    pid: int | None = None
    program: str = "main.py"


class WarmCLI:
    """`python main.py ...` as a forked child of one warm server: `run(argv, cwd, env)` -> CompletedProcess."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.logs = Path(tempfile.mkdtemp(prefix="warm_cli_"))
        self.count = 0

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.Popen(
            [sys.executable, __file__, "--stream"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(proc.stdout.readline()).get("ready"), "cli_runner: the warm server did not start"
        return proc

    def run(
        self,
        argv: list[str],
        cwd: str | Path | None = None,
        env: dict | None = None,
        timeout: float = 300,
        module: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `main.py argv` (or `python -m module argv`) in `cwd` (default: the current directory) with `env`
        (default: this environment)."""
        return self.wait(self._send(argv, cwd, env, module=module), timeout)

    def start(self, argv: list[str], cwd: str | Path | None = None, env: dict | None = None) -> Started:
        """Start `main.py argv` in the background (as `run` would run it); `wait` collects it."""
        started = self._send(argv, cwd, env, detach=True)
        started.pid = json.loads(self.proc.stdout.readline())["pid"]
        return started

    def wait(self, started: Started, timeout: float = 300) -> subprocess.CompletedProcess:
        """The finished command (its exit code; -9 for one killed by SIGKILL), once it ends."""
        import select

        if started.pid is not None:
            self.proc.stdin.write(json.dumps({"wait": started.pid}) + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()  # the hung child goes with its server; the next command starts a fresh one
            raise subprocess.TimeoutExpired([started.program, *started.argv], timeout)
        reply = json.loads(self.proc.stdout.readline())
        completed = subprocess.CompletedProcess(
            [started.program, *started.argv], reply["rc"], started.out.read_text(), started.err.read_text()
        )
        started.out.unlink()
        started.err.unlink()
        return completed

    def _send(
        self, argv: list[str], cwd: str | Path | None, env: dict | None, detach: bool = False, module: str | None = None
    ) -> Started:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd()), "env": dict(env or os.environ)}
        request |= {"stdout": str(out), "stderr": str(err), "detach": detach, "module": module}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Started(request["argv"], out, err, program=f"-m {module}" if module else "main.py")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    if sys.argv[1:] == ["--stream"]:
        serve_stream()
    else:
        serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
