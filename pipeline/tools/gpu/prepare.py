"""Prepare the folder that travels to the GPU machine, and print the command to run there.

    python -m pipeline.tools.gpu.prepare [--carry .gpu_carry] [--budget 330]

Fills ``.gpu_carry/`` (ignored by git; it travels by being named in the run's ``carry``):

- ``whl/``: the pure-Python wheels ``gpu_check`` needs that the GPU machine lacks (omegaconf and its
  antlr4 runtime: ``pipeline``'s modules take their config nodes as DictConfig), fetched with ``pip
  download`` for CPython 3.12 (the GPU machine's), the versions of this environment;
- ``data/``: the slices of the calibration and evaluation texts the tiny stage check reads (the first
  ``--text-bytes`` of enwiki and of WikiText-2 test, cut at a line end), laid out as ``RSQ_DATA_DIR``.

Then prints the ``run`` command line (at most 2,000 characters), the ``carry`` list and the timeout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ...infra.config import REPO_ROOT
from ...eval.data import ENWIKI_FILE, WIKITEXT_TEST_FILE, data_dir
from ...infra.errors import PipelineError

WHEELS = ("omegaconf", "antlr4-python3-runtime")
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "any"]
RESULT_NAME = "gpu_check.json"
SLACK_S = 90  # the run's timeout over the check's budget: wheels, start-up, the last part's overrun


def download_wheels(folder: Path) -> list[Path]:
    """The wheels of ``WHEELS`` at this environment's versions (pure Python: any platform tag; an sdist-only
    release is built into a wheel here)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
    for pin in pins:
        done = subprocess.run([*base, *PIP_PLATFORM, pin], capture_output=True, text=True)
        if done.returncode != 0:  # antlr4 4.9.3 is an sdist only: build its (pure-Python) wheel here
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), pin],
                                   capture_output=True, text=True)
            if built.returncode != 0:
                raise PipelineError(f"could not fetch a wheel of {pin}: {(built.stderr or done.stderr).strip()[-300:]}")
    return sorted(folder.glob("*.whl"))


def copy_slice(src: Path, dst: Path, nbytes: int) -> None:
    """The first ``nbytes`` of a text file, cut back to the last line end (whole lines, valid UTF-8)."""
    raw = src.read_bytes()[:nbytes]
    cut = raw.rfind(b"\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(raw[: cut + 1] if cut >= 0 else raw)


def run_command(carry: str, budget: float) -> str:
    """The one shell line the GPU machine runs from the repo root (``$OUT`` comes back)."""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        f"{carry}/whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
        f"export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RSQ_DATA_DIR=$PWD/{carry}/data PYTHONUNBUFFERED=1 "
        f"TORCH_EXTENSIONS_DIR=/tmp/rsq_ext MAX_JOBS=16 TQDM_DISABLE=1; set -o pipefail; "
        f"timeout -s INT {int(budget + 45)} python3 -m pipeline.tools.gpu.check --budget {int(budget)} --out $OUT 2>&1 "
        f"| tee $OUT/gpu_check.log"
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.gpu.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--carry", default=".gpu_carry", help="the folder (relative to the repo root) that travels")
    parser.add_argument("--budget", type=float, default=330.0, help="gpu_check --budget, seconds")
    parser.add_argument("--text-bytes", type=int, default=400_000, help="bytes of each text slice")
    args = parser.parse_args(argv)
    carry = REPO_ROOT / args.carry
    source = data_dir({})
    if source is None:
        raise PipelineError("set RSQ_DATA_DIR to the data folder (../shared/data): the text slices come from it")
    wheels = download_wheels(carry / "whl")
    for rel in (ENWIKI_FILE, WIKITEXT_TEST_FILE):
        copy_slice(source / rel, carry / "data" / rel, args.text_bytes)
    command = run_command(args.carry, args.budget)
    if len(command) > 2000:
        raise PipelineError(f"the run command is {len(command)} characters, over the 2,000 allowed")
    timeout = int(args.budget + 45 + SLACK_S)
    print(f"prepared {carry} ({folder_bytes(carry) / 2**20:.2f} MiB): {', '.join(p.name for p in wheels)}")
    print(json.dumps({"command": command, "carry": [args.carry], "timeout_s": min(timeout, 600)}, indent=1))
    print(f"results: $OUT/{RESULT_NAME} and $OUT/gpu_check.log (+ kernel_build.log); then "
          f"python -m pipeline.tools.gpu.merge <files_at>/{RESULT_NAME}")


if __name__ == "__main__":
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
