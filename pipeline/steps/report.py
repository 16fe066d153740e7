"""report: the comparison table of every compared variant, as ``results.md`` and a csv for DVC plots.

Reads ``metrics/eval/<variant>.json`` and ``metrics/eval_windows/<variant>.json`` for each of
``variants`` (and the per-window NLLs of the seed runs in ``report.seeds``, ``pipeline.seed_runs``), and
the rank sweep csvs (if the pipeline made them), and writes them out as one markdown file, so a reader
without MLflow or DVC sees the results. It computes only statistics of recorded numbers: mean ± std
over seeds and paired-bootstrap intervals of ppl ratios (``seed_stats``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from .. import paths
from ..artifacts import atomic_path, write_csv
from ..errors import PipelineError
from ..seed_stats import mean_std, paired_ratio
from ..tracking import stage_run


def _fmt(value, digits: int) -> str:
    return "–" if value is None or value == "" else f"{float(value):.{digits}f}"


REFERENCES = ("spinquant", "layerwise")  # the methods every row's ratio is taken against


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def window_tables(cfg: DictConfig, name: str) -> dict[int, dict]:
    """``{seed: metrics/eval_windows json}`` of variant ``name`` over ``report.seeds`` (seed 0 from
    ``dvc repro``'s metrics, seed k from ``pipeline.seed_runs``'); seed 0 must be there, others may be
    missing (a variant run under fewer seeds). Each file is read once."""
    out = {}
    for seed in cfg.report.get("seeds") or [0]:
        root = paths.metrics(cfg) if seed == 0 else paths.seed_metrics(cfg, seed)
        path = root / "eval_windows" / f"{name}.json"
        if seed != 0 and not path.is_file():
            continue
        data = _read_json(path, f"run the eval stage of variant {name} first")
        if data.get("seed", 0) != seed:
            raise PipelineError(f"{path} records seed {data.get('seed')}, its folder says seed {seed}")
        out[seed] = data
    return out


def _check_paired(tables: dict[str, dict[int, dict]]) -> str:
    """Every variant and seed was evaluated on the same windows of the same text; its metric prefix."""
    def signature(data: dict) -> tuple:
        return data["corpus"], data["text_sha256"], data["seqlen"], len(data["window_nll"])

    runs = [(name, seed, signature(data)) for name, by_seed in tables.items() for seed, data in by_seed.items()]
    first = runs[0]
    for other in runs[1:]:
        if other[2] != first[2]:
            raise PipelineError(f"variants {first[0]} (seed {first[1]}) and {other[0]} (seed {other[1]}) were "
                                f"evaluated on different windows ({first[2][0]} x{first[2][3]} vs "
                                f"{other[2][0]} x{other[2][3]}): rerun eval")
    return "wikitext2" if first[2][0] == "wikitext2" else "corpus"


def _reference(rows: list[dict], row: dict, method: str) -> dict | None:
    """The ``method`` row a row is compared with: same quant, same weight quantizer if there is one."""
    same_quant = [r for r in rows if r["method"] == method and r["quant"] == row["quant"]]
    same = [r for r in same_quant if r["weights"] == row["weights"]]
    return (same or same_quant or [None])[0]


def _ratio_columns(row: dict, ref: dict | None, nlls: dict[str, dict[int, torch.Tensor]], method: str,
                   draws: int, level: float) -> dict:
    """``ratio_vs_<method>`` (+ interval, significance) of ``row`` against ``ref``; empty cells without one."""
    cols = [f"ratio_vs_{method}", f"ratio_vs_{method}_ci_low", f"ratio_vs_{method}_ci_high",
            f"significant_vs_{method}"]
    if ref is None or ref is row:
        return dict.fromkeys(cols)
    mine, theirs = nlls[row["variant"]], nlls[ref["variant"]]
    common = sorted(set(mine) & set(theirs))
    r = paired_ratio(torch.stack([mine[s] for s in common]), torch.stack([theirs[s] for s in common]), draws, level)
    return dict(zip(cols, (r.ratio, r.low, r.high, "yes" if r.significant else "no")))


def method_rows(cfg: DictConfig) -> list[dict]:
    """One row per variant: variant, method, quant, weights, seeds, ppl (seed 0) and its mean and std over
    seeds, the ratio to SpinQuant and to exact layer-wise (same quant) with paired-bootstrap intervals and
    significance, each zero-shot task, zeroshot_avg (seed 0)."""
    names = list(cfg.variants)
    results = {name: _read_json(paths.eval_metrics(cfg, name), f"run the eval stage of variant {name} first")
               for name in names}
    tables = {name: window_tables(cfg, name) for name in names}
    key = _check_paired(tables)
    nlls = {name: {seed: torch.tensor(data["window_nll"], dtype=torch.float64) for seed, data in by_seed.items()}
            for name, by_seed in tables.items()}
    rows, zeroshot = [], []
    for name in names:
        result = results[name]
        mean, std = mean_std(torch.stack(list(nlls[name].values())))
        rows.append({"variant": name, "method": result["method"], "quant": result["quant"],
                     "weights": result.get("weights", "rtn"), "seeds": len(nlls[name]),
                     f"{key}_ppl": result[f"{key}_ppl"], f"{key}_ppl_mean": mean, f"{key}_ppl_std": std})
        zeroshot.append({**{task: result[task] for task in result.get("zeroshot_tasks", [])},
                         "zeroshot_avg": result.get("zeroshot_avg")})
    draws, level = int(cfg.report.get("bootstrap", 2000)), float(cfg.report.get("level", 0.95))
    ratios = [{k: v for method in REFERENCES
               for k, v in _ratio_columns(row, _reference(rows, row, method), nlls, method, draws, level).items()}
              for row in rows]
    return [{**row, **ratio, **tasks} for row, ratio, tasks in zip(rows, ratios, zeroshot)]


def _ratio_cell(row: dict, method: str) -> str:
    if row.get(f"ratio_vs_{method}") is None:
        return "–"
    star = " *" if row[f"significant_vs_{method}"] == "yes" else ""
    return (f"{row[f'ratio_vs_{method}']:.3f} [{row[f'ratio_vs_{method}_ci_low']:.3f}, "
            f"{row[f'ratio_vs_{method}_ci_high']:.3f}]{star}")


def _sweep_lines(name: str, sweep: list[dict]) -> list[str]:
    lines = ["", f"## `{name}`: perplexity against the subspace rank r", "",
             f"On the first {sweep[0]['windows']} evaluation windows (`rank_sweep.max_windows`).", "",
             "| rank | mean rank | energy captured | ‖T̂−T‖/‖T−I‖ | basis error | WikiText-2 ppl |",
             "|---|---|---|---|---|---|"]
    for r in sweep:
        lines.append(f"| {r['rank']} | {_fmt(r['mean_rank'], 1)} | {_fmt(r['mean_energy'], 3)} | "
                     f"{_fmt(r['mean_rel_error'], 3)} | {_fmt(r.get('mean_basis_error'), 4)} | "
                     f"{_fmt(r['wikitext2_ppl'], 2)} |")
    return lines


def markdown(cfg: DictConfig, rows: list[dict], sweeps: dict[str, list[dict]]) -> str:
    first = json.loads(paths.eval_metrics(cfg, rows[0]["variant"]).read_text())
    key = "wikitext2" if "wikitext2_ppl" in rows[0] else "corpus"
    corpus = "WikiText-2 test" if key == "wikitext2" else f"`{first.get('corpus')}`"
    fixed = {"variant", "method", "quant", "weights", "seeds", "zeroshot_avg"}
    tasks = [k for k in rows[0] if k not in fixed and not k.startswith(("ratio_vs_", "significant_vs_", key))]
    limit = first.get("zeroshot_limit")
    level = float(cfg.report.get("level", 0.95))
    lines = [
        "# Results",
        "",
        f"Written by the `report` stage of `dvc repro` from `{paths.metrics(cfg)}/eval/*.json`; do not edit by hand.",
        "",
        f"- Model: `{cfg.model.name}`.",
        f"- Perplexity on {corpus}, {first[f'{key}_windows']} windows of {first[f'{key}_seqlen']} tokens"
        f" ({first[f'{key}_tokens']} predicted tokens), the same windows for every row. ppl: seed 0 (`dvc repro`);"
        " mean ± std: over the row's seeds (`python -m pipeline.seed_runs`).",
        f"- Ratios: mean ppl over the seeds both rows have, divided by the SpinQuant / exact layer-wise row of the"
        f" same quant; [{level:.0%} interval] from a paired bootstrap over seeds and windows"
        f" ({int(cfg.report.get('bootstrap', 2000))} draws); * = the interval excludes 1.",
    ]
    if tasks:
        lines.append(f"- Zero-shot accuracy (seed 0; lm-eval, local task files; acc_norm where the task defines it, "
                     f"else acc), {'all items' if limit is None else f'the first {limit} items per task'}.")
    header = ["variant", "method", "quant", "weights", "seeds", "ppl", "mean ± std", "vs spinquant",
              "vs layerwise", *tasks] + (["zero-shot avg"] if tasks else [])
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        std = row[f"{key}_ppl_std"]
        spread = _fmt(row[f"{key}_ppl_mean"], 2) + ("" if std is None else f" ± {std:.2f}")
        cells = [row["variant"], row["method"], row["quant"], row["weights"], str(row["seeds"]),
                 _fmt(row[f"{key}_ppl"], 2), spread, _ratio_cell(row, "spinquant"), _ratio_cell(row, "layerwise")]
        cells += [_fmt(row.get(t), 3) for t in tasks] + ([_fmt(row["zeroshot_avg"], 3)] if tasks else [])
        lines.append("| " + " | ".join(cells) + " |")
    for name, sweep in sweeps.items():
        lines += _sweep_lines(name, sweep)
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> None:
    import mlflow

    if not cfg.get("variants"):
        raise PipelineError("report compares the variants of conf/pipeline.yaml: run it as DVC does "
                            "(python stages/report.py -cd . -cn params)")
    rows = method_rows(cfg)
    if not rows:
        raise PipelineError("variants is empty: nothing to report")
    sweeps = {}
    for name in cfg.get("rank_sweep", {}).get("variants") or {}:
        if paths.rank_sweep(cfg, name).is_file():
            with paths.rank_sweep(cfg, name).open() as f:
                sweeps[name] = list(csv.DictReader(f))
    out = Path(cfg.report.path)
    with stage_run(cfg, "report"):
        write_csv(paths.report_table(cfg), rows)
        with atomic_path(out) as tmp:
            tmp.write_text(markdown(cfg, rows, sweeps))
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(paths.report_table(cfg)))
