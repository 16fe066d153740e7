"""Stage scripts run as a user runs them (``python stages/<script> ...``), without paying Python's imports
on every run (~6 s: torch, transformers, mlflow, Hydra): a server that has imported them forks one child per
run, and the child becomes the script (``__main__``) with the run's argv, cwd, environment and standard
streams, as a new process would: its own copy of every module's state, atexit handlers run at its end,
its exit status from ``sys.exit``, or 1 with the traceback on stderr for an uncaught exception. A script
from another checkout (the DVC test's copy of the repo) imports that checkout's ``pipeline`` afresh.

- ``run_script``: a ``subprocess.run``-alike for the tests' own stage runs (helpers.run_stage), through a
  ``multiprocessing`` fork server that preloads the modules.
- ``python_shim``: a ``python`` executable for PATH that sends ``python <script>.py ...`` to a fork
  server over a Unix socket, passing its stdin/stdout/stderr (what DVC stages run under); anything else,
  or a failed connection, runs the real interpreter.

Where a run's environment differs from the server's in a variable a preloaded module reads at import
(``HF_*``, ``TRANSFORMERS_*``, ``TORCH*``, ``OMP_*``, ...), the run gets a new interpreter instead, so no
test sees a setting the preloaded modules have already fixed.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "mlflow", "hydra", "omegaconf",
           "safetensors.torch", "pipeline.infra.config", "pipeline.steps.calibrate", "pipeline.steps.train_rotation",
           "pipeline.steps.approximate", "pipeline.steps.fuse", "pipeline.steps.evaluate", "pipeline.steps.rank_sweep",
           "pipeline.steps.bench", "pipeline.steps.report"]
# variables some preloaded module reads once, at import (PYTHONPATH is applied by the child itself)
IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TORCH", "PYTORCH", "OMP_", "MKL", "KMP_",
               "CUDA", "NVIDIA", "PYTHON", "MLFLOW_ENABLE")

_server: list = []  # [context, the import-time variables it started with]


def _import_time(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHONPATH"}


def _become(script: str, args: list[str], env: dict, cwd: str) -> int:
    """In a forked child: run ``python <script> <args>`` in ``cwd`` under ``env``; its exit status."""
    code = 0
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        script = str(Path(cwd, script).resolve())
        root = Path(script).parents[1]
        loaded = sys.modules.get("pipeline")
        if loaded is not None and Path(loaded.__file__).resolve().parents[1] != root:  # another checkout's code
            for name in [n for n in sys.modules if n == "pipeline" or n.startswith("pipeline.")]:
                del sys.modules[name]
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [str(Path(script).parent), *extra]
        sys.stdin = open(os.devnull)
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return code


def _child(script: str, args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os._exit(_become(script, args, env, cwd))


def _context():
    if not _server:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _server.extend([ctx, _import_time(dict(os.environ))])
    return _server[0]


def run_script(script: Path, args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], cwd=cwd, env=env, capture_output=True, text=True)``, forked."""
    argv = [sys.executable, str(script), *args]
    ctx = _context()
    if _import_time(env) != _server[1]:  # a setting the preloaded modules fixed at import: a new interpreter
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        proc = ctx.Process(target=_child, args=(str(script), list(args), dict(env), str(cwd), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess(argv, proc.exitcode, read(out), read(err))


# --- the PATH shim: python <script>.py from any process (DVC) through a socket -----------------------
SHIM = '''#!{python} -S
# tests/stage_runner.py: python <script>.py runs forked from preloaded imports; anything else is the real python
import json, os, socket, sys
args = sys.argv[1:]
def real():
    os.execv({python!r}, [{python!r}, *args])
if not args or not args[0].endswith(".py") or args[0].startswith("-"):
    real()
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect({sock!r})
except OSError:
    real()
body = json.dumps({{"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
socket.send_fds(s, [len(body).to_bytes(8, "little") + body], [0, 1, 2])
reply = b""
while True:
    chunk = s.recv(64)
    if not chunk:
        break
    reply += chunk
if reply == b"fallback" or not reply:
    real()
sys.exit(int(reply))
'''


def _serve(path: str, baseline: dict) -> None:
    """The socket server (forked from the preloaded fork server): one stage at a time."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        size, body = int.from_bytes(data[:8], "little"), data[8:]
        while len(body) < size:
            body += conn.recv(size - len(body))
        req = json.loads(body)
        if len(fds) != 3 or _import_time(req["env"]) != baseline:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"fallback")
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            srv.close()
            conn.close()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
                os.close(fd)
            os._exit(_become(req["argv"][0], req["argv"][1:], req["env"], req["cwd"]))
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
        conn.close()


@contextlib.contextmanager
def python_shim(folder: Path) -> Iterator[Path]:
    """A folder holding a ``python`` to put first on PATH (module doc), served while the context lasts."""
    folder.mkdir(parents=True, exist_ok=True)
    sock = str(Path(tempfile.mkdtemp(prefix="rsq-shim-")) / "s")  # short: AF_UNIX paths are capped at 108 bytes
    ctx = _context()
    server = ctx.Process(target=_serve, args=(sock, _server[1]), daemon=True)
    server.start()
    shim = folder / "python"
    shim.write_text(SHIM.format(python=sys.executable, sock=sock))
    shim.chmod(0o755)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock) and server.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield folder
    finally:
        server.kill()
        server.join()
