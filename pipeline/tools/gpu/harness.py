"""The GPU check's harness: the budget, the context every part gets, the result file, and how a part
runs (its failure is a row, the rest still runs)."""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

RESULT_FILE = "gpu_check.json"
BUILD_LOG = "kernel_build.log"
SCHEMA = 1
PAPER_MINUTES_H100 = 42.0  # the paper's whole calibration of Llama-3-8B on one H100


@dataclass
class Budget:
    """Seconds left of the run's budget (wall clock from ``start``)."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Context:
    """What every part gets: the device under test, the mode, the results, and a scratch folder."""

    device: torch.device
    tiny: bool
    args: argparse.Namespace
    budget: Budget
    report: "Report"
    work: Path
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> str | None:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gpu_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)


class Report:
    """The result file: ``meta`` (run, env), ``parts`` (status per part), ``checks`` (comparisons with
    their bounds), ``scale`` rows (``docs/scale.json`` schema) and ``bench`` rows (``metrics/bench.json``
    schema), written atomically after every part."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"schema": SCHEMA, "meta": meta, "parts": [], "checks": [], "scale": [], "bench": []}

    def check(self, part: str, name: str, ok: bool, bound: str, **values: Any) -> None:
        """One comparison: ``ok`` says whether ``values`` lie within ``bound`` (stated in words)."""
        row = {"part": part, "name": name, "ok": bool(ok), "bound": bound, **values}
        self.data["checks"].append(row)
        print(f"[{'PASS' if ok else 'FAIL'}] {part}/{name} {json.dumps(values, default=str)[:300]}", flush=True)

    def scale(self, row: dict[str, Any]) -> None:
        self.data["scale"].append(row)
        print(f"[scale] {json.dumps(row, default=str)[:300]}", flush=True)

    def bench(self, row: dict[str, Any]) -> None:
        self.data["bench"].append(row)

    def part(self, name: str, status: str, seconds: float, error: str | None = None, tail: str | None = None) -> None:
        row = {"part": name, "status": status, "seconds": round(seconds, 1)}
        if error is not None:
            row.update(error=error, traceback_tail=tail)
        self.data["parts"].append(row)
        print(f"[part] {name}: {status} ({seconds:.1f} s){' ' + error if error else ''}", flush=True)

    def write(self, elapsed: float) -> None:
        self.data["meta"]["elapsed_s"] = round(elapsed, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@dataclass(frozen=True)
class Part:
    """A named step of the check with its time estimate in seconds (on the GPU, and tiny on the CPU)."""

    name: str
    run: Callable[[Context], None]
    estimate: float
    tiny_estimate: float = 1.0


def run_part(ctx: Context, part: Part) -> None:
    """Run one part unless the budget is short; record its status (and error) and rewrite the file."""
    start = time.perf_counter()
    need = part.tiny_estimate if ctx.tiny else part.estimate
    if ctx.budget.left() < need:
        ctx.report.part(part.name, "skipped: budget", 0.0,
                        error=f"skipped: budget ({ctx.budget.left():.0f} s left, about {need:.0f} s needed)")
    else:
        try:
            part.run(ctx)
            ctx.report.part(part.name, "ok", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - every part's failure is a result row, the rest still runs
            tail = traceback.format_exc()[-1500:]
            ctx.report.part(part.name, "failed", time.perf_counter() - start, error_line(exc), tail)
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    ctx.report.write(ctx.budget.elapsed())
