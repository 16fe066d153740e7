"""report: the comparison table of every compared variant, as ``results.md`` and a csv for DVC plots.

Reads ``metrics/eval/<variant>.json`` for each of ``variants`` and the rank sweep csv (if the
pipeline made one) and writes them out as one markdown file, so a reader without MLflow or DVC sees
the results. Nothing here computes a result.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..artifacts import atomic_path, write_csv
from ..errors import PipelineError
from ..tracking import stage_run


def _fmt(value, digits: int) -> str:
    return "–" if value is None or value == "" else f"{float(value):.{digits}f}"


def method_rows(cfg: DictConfig) -> list[dict]:
    """One row per variant: variant, method, quant, weights, wikitext2_ppl, each task, zeroshot_avg."""
    rows = []
    for name in cfg.variants:
        path = paths.eval_metrics(cfg, name)
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run the eval stage of variant {name} first")
        result = json.loads(path.read_text())
        row = {"variant": name, "method": result["method"], "quant": result["quant"],
               "weights": result.get("weights", "rtn"), "wikitext2_ppl": result["wikitext2_ppl"]}
        for task in result.get("zeroshot_tasks", []):
            row[task] = result[task]
        row["zeroshot_avg"] = result.get("zeroshot_avg")
        rows.append(row)
    return rows


def markdown(cfg: DictConfig, rows: list[dict], sweep: list[dict] | None, sweep_name: str | None) -> str:
    first = json.loads(paths.eval_metrics(cfg, rows[0]["variant"]).read_text())
    tasks = [k for k in rows[0] if k not in ("variant", "method", "quant", "weights", "wikitext2_ppl", "zeroshot_avg")]
    limit = first.get("zeroshot_limit")
    lines = [
        "# Results",
        "",
        f"Written by the `report` stage of `dvc repro` from `{paths.metrics(cfg)}/eval/*.json`; do not edit by hand.",
        "",
        f"- Model: `{cfg.model.name}`.",
        f"- WikiText-2 test perplexity on {first['wikitext2_windows']} windows of {first['wikitext2_seqlen']} tokens"
        f" ({first['wikitext2_tokens']} predicted tokens), the same windows for every row.",
    ]
    if tasks:
        lines.append(f"- Zero-shot accuracy (lm-eval, local task files; acc_norm where the task defines it, "
                     f"else acc), {'all items' if limit is None else f'the first {limit} items per task'}.")
    header = ["variant", "method", "quant", "weights", "WikiText-2 ppl", *tasks] + (["zero-shot avg"] if tasks else [])
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], row["method"], row["quant"], row["weights"], _fmt(row["wikitext2_ppl"], 2)]
        cells += [_fmt(row.get(t), 3) for t in tasks] + ([_fmt(row["zeroshot_avg"], 3)] if tasks else [])
        lines.append("| " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", f"## `{sweep_name}`: perplexity against the subspace rank r", "",
                  f"On the first {sweep[0]['windows']} evaluation windows (`rank_sweep.max_windows`).", "",
                  "| rank | mean rank | energy captured | ‖T̂−T‖/‖T−I‖ | WikiText-2 ppl |", "|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['rank']} | {_fmt(r['mean_rank'], 1)} | {_fmt(r['mean_energy'], 3)} | "
                         f"{_fmt(r['mean_rel_error'], 3)} | {_fmt(r['wikitext2_ppl'], 2)} |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> None:
    if not cfg.get("variants"):
        raise PipelineError("report compares the variants of conf/pipeline.yaml: run it as DVC does "
                            "(python stages/report.py -cd . -cn params)")
    rows = method_rows(cfg)
    if not rows:
        raise PipelineError("variants is empty: nothing to report")
    sweep_name = cfg.get("rank_sweep", {}).get("variant")
    sweep = None
    if sweep_name and paths.rank_sweep(cfg, sweep_name).is_file():
        with paths.rank_sweep(cfg, sweep_name).open() as f:
            sweep = list(csv.DictReader(f))
    out = Path(cfg.report.path)
    with stage_run(cfg, "report"):
        write_csv(paths.report_table(cfg), rows)
        with atomic_path(out) as tmp:
            tmp.write_text(markdown(cfg, rows, sweep, sweep_name))
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(paths.report_table(cfg)))
