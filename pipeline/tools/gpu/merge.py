"""Publish a ``gpu_check`` result: its rows into ``docs/scale.json``, ``docs/bench-gpu.json`` and a section of
``docs/scale.md`` labelled with the GPU, the date and the random-weight caveat.

    python -m pipeline.tools.gpu.merge RESULT.json [--scale docs/scale.json] [--bench docs/bench-gpu.json]
                                             [--readme docs/scale.md]

- ``docs/scale.json``: the result's ``scale`` rows appended (``source: gpu_check`` and the run's date);
  rows of the same run merged before are replaced, so merging twice changes nothing.
- ``docs/bench-gpu.json``: the latest GPU run as a whole, in ``metrics/bench.json``'s layout
  (``backend, device, note, rows``) plus ``gpu``, ``date``, ``env``, ``checks`` and ``parts``.
- ``--readme`` (``docs/scale.md``): the text between ``<!-- gpu-check:begin -->`` and ``<!-- gpu-check:end -->`` replaced (the
  section is appended at the end when the markers are absent).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ...infra.config import REPO_ROOT
from ...infra.errors import PipelineError

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
CAVEAT = ("**Random weights**: the Llama-3-8B-shaped model was generated on the machine; time and memory do not "
          "depend on weight values, and no quality figure of it is reported.")


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable gpu_check result ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not {"meta", "scale", "bench", "checks", "parts"} <= set(data):
        raise PipelineError(f"{path} is not a gpu_check result (it lacks meta, scale, bench, checks or parts)")
    return data


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def merge_scale(result: dict, path: Path) -> int:
    """Append the result's scale rows to ``path`` (a JSON list), replacing this run's earlier merge."""
    rows = json.loads(path.read_text()) if path.is_file() else []
    run = result["meta"]["date"]
    kept = [r for r in rows if not (r.get("source") == "gpu_check" and r.get("run") == run)]
    new = [{**r, "source": "gpu_check", "run": run} for r in result["scale"]]
    _write(path, json.dumps(kept + new, indent=1) + "\n")
    return len(new)


def merge_bench(result: dict, path: Path) -> None:
    meta = result["meta"]
    _write(path, json.dumps({
        "backend": meta["device"], "device": meta["device"], "gpu": meta.get("gpu"), "date": meta["date"],
        "tool": meta.get("tool"), "env": meta.get("env"),
        "note": "W4A4 linear (activation quantization + int4 GEMM + dequant) and the GEMM alone against the bf16 "
                "linear (cuBLAS); speedup = linear_bf16 ms / op ms; Llama-3-8B shapes with random weights",
        "rows": result["bench"], "checks": result["checks"], "parts": result["parts"]}, indent=1) + "\n")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def readme_section(result: dict) -> str:
    """The README's GPU section: label, caveat, stage table, kernel table, check summary."""
    meta = result["meta"]
    env = meta.get("env", {})
    gpu = meta.get("gpu") or meta["device"]
    lines = [BEGIN, f"### GPU check: {gpu}, {meta['date'][:10]}", "",
             f"`python -m pipeline.tools.gpu.check` ({meta.get('elapsed_s', '?')} s of a {meta.get('budget_s', '?')} s budget; "
             f"torch {env.get('torch', '?')}, CUDA {env.get('torch_cuda', '?')}, driver {env.get('driver', '?')}). {CAVEAT}",
             ""]
    checks = result["checks"]
    failed = [c for c in checks if not c["ok"]]
    lines.append(f"Checks: {len(checks) - len(failed)} of {len(checks)} passed (each with its bound in "
                 "`docs/bench-gpu.json`)." + (" Failed: " + ", ".join(f"`{c['part']}/{c['name']}`" for c in failed[:12])
                                               if failed else ""))
    bad = [p for p in result["parts"] if p["status"] != "ok"]
    if bad:
        lines.append("Parts not run or failed: " + "; ".join(f"`{p['part']}` {p.get('error') or p['status']}"
                                                               for p in bad))
    lines += ["", "| stage (random weights) | measured | time s | peak GPU GiB | projected s |", "|---|---|---|---|---|"]
    for r in result["scale"]:
        lines.append(f"| {r['shape']} {r['stage']} | {r.get('measured', '')} | {_fmt(r.get('seconds'))} | "
                     f"{_fmt(r.get('peak_gpu_gib'))} | {_fmt(r.get('projected_seconds'))} |")
    total = next((r for r in result["scale"] if r["stage"] == "paper_protocol_total"), None)
    if total is not None and total.get("ratio_to_paper") is not None:
        lines += ["", f"Paper protocol projected: {total['projected_seconds'] / 60:.1f} min against the paper's "
                      f"{total['paper_seconds_h100'] / 60:.0f} min on one H100 ({total['ratio_to_paper']:.2f}x; "
                      f"{total.get('note', '')})."]
    lines += ["", "| op | shape | M | ms | speedup vs bf16 |", "|---|---|---|---|---|"]
    for r in result["bench"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['M']} | {_fmt(r.get('ms'), 4)} | {_fmt(r.get('speedup'))} |")
    lines += [END]
    return "\n".join(lines)


def merge_readme(result: dict, path: Path) -> None:
    text = path.read_text() if path.is_file() else ""
    section = readme_section(result)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write(path, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.gpu.merge", description=__doc__.splitlines()[0])
    parser.add_argument("result", help="the gpu_check.json a GPU run returned")
    parser.add_argument("--scale", default=str(REPO_ROOT / "docs" / "scale.json"))
    parser.add_argument("--bench", default=str(REPO_ROOT / "docs" / "bench-gpu.json"))
    parser.add_argument("--readme", default=str(REPO_ROOT / "docs" / "scale.md"), help="the markdown file whose "
                        "gpu-check section is replaced")
    args = parser.parse_args(argv)
    result = read_result(Path(args.result))
    if result["meta"]["device"] != "cuda":
        raise PipelineError(f"{args.result} was measured on {result['meta']['device']}, not a GPU: nothing to publish")
    n = merge_scale(result, Path(args.scale))
    merge_bench(result, Path(args.bench))
    merge_readme(result, Path(args.readme))
    print(f"merged {n} scale rows into {args.scale}, {len(result['bench'])} bench rows into {args.bench}, "
          f"the section into {args.readme}")


if __name__ == "__main__":
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
