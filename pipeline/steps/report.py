"""report: the comparison table of every compared variant, as ``results.md`` and a csv for DVC plots.

Reads every recorded run of each of ``variants`` (``seed_results``: seed 0 from ``dvc repro``'s
``metrics/eval/<variant>.json`` and ``metrics/eval_windows/<variant>.json``, seed k of ``report.seeds``
from ``pipeline.tools.seed_runs``' ``metrics/seeds/seed<k>/``), and the rank sweep csvs (if the pipeline made
them), and writes them out as one markdown file, so a reader without MLflow or DVC sees the results. It
computes only statistics of recorded numbers: mean ± std over seeds and paired t-intervals over seeds
of ppl ratios (``seed_stats``).

It pools only runs of one configuration: the runs of one row must agree in everything but ``POOLED``
(else one line names both files), every run was evaluated on the same windows, and a row is compared
only with a reference row of the same quant and weight quantizer (none: empty cells).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..infra import paths
from ..infra.artifacts import atomic_path, write_csv
from ..eval.cells_report import matrix_markdown, matrix_rows
from ..infra.config import select_variant
from ..infra.errors import PipelineError
from ..infra.settings import output_setting
from ..eval.results import SeedResult, check_made_under, check_one_config, check_paired
from ..eval.seed_stats import mean_std, paired_ratio
from ..infra.tracking import stage_run


def _fmt(value, digits: int) -> str:
    return "–" if value is None or value == "" else f"{float(value):.{digits}f}"


REFERENCES = ("spinquant", "layerwise")  # the methods every row's ratio is taken against
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def seed_results(metrics: Path, names: list[str], seeds: list[int]) -> dict[str, list[SeedResult]]:
    """``{variant: [SeedResult, ...]}`` of ``names`` over ``seeds``: the one reader of the results layout.

    Seed 0 is ``dvc repro``'s, ``<metrics>/eval/<variant>.json`` and ``<metrics>/eval_windows/<variant>.json``,
    and must be there; seed k >= 1 is ``pipeline.tools.seed_runs``', the same files under
    ``<metrics>/seeds/seed<k>/``, skipped when its eval json is absent (a variant run under fewer seeds).
    A file that records another seed than its folder's is refused. Each file is read once."""
    out = {}
    for name in names:
        runs = []
        for seed in seeds:
            root = metrics if seed == 0 else metrics / "seeds" / f"seed{seed}"
            path, windows_path = root / "eval" / f"{name}.json", root / "eval_windows" / f"{name}.json"
            if seed != 0 and not path.is_file():
                continue
            result = _read_json(path, f"run the eval stage of variant {name} first")
            windows = _read_json(windows_path, f"rerun the eval stage of variant {name} (seed {seed})")
            for file, data in ((path, result), (windows_path, windows)):
                if data.get("seed", 0) != seed:
                    raise PipelineError(f"{file} records seed {data.get('seed')}, its folder says seed {seed}")
            runs.append(SeedResult(seed, path, result, windows))
        out[name] = runs
    return out


def _comparable(row: dict, config: dict) -> tuple:
    """What a reference row must share with the row it is compared with."""
    return config.get("model.name"), row["quant"], row["weights"]


def _reference(rows: list[dict], row: dict, method: str, configs: dict[str, dict]) -> dict | None:
    """The ``method`` row a row is compared with: same quant and weight quantizer (and model), else none."""
    mine = _comparable(row, configs[row["variant"]])
    same = [r for r in rows if r["method"] == method and _comparable(r, configs[r["variant"]]) == mine]
    return (same or [None])[0]


def _ratio_columns(row: dict, ref: dict | None, nlls: dict[str, dict[int, torch.Tensor]], method: str,
                   level: float) -> dict:
    """``ratio_vs_<method>`` (+ interval, significance) of ``row`` against ``ref``, paired on the seeds both
    have; empty cells without a reference, no interval and no verdict with fewer than 2 common seeds."""
    cols = [f"ratio_vs_{method}", f"ratio_vs_{method}_ci_low", f"ratio_vs_{method}_ci_high",
            f"significant_vs_{method}"]
    if ref is None or ref is row:
        return dict.fromkeys(cols)
    mine, theirs = nlls[row["variant"]], nlls[ref["variant"]]
    common = sorted(set(mine) & set(theirs))
    if not common:
        return dict.fromkeys(cols)
    r = paired_ratio(torch.stack([mine[s] for s in common]), torch.stack([theirs[s] for s in common]), level)
    verdict = None if r.significant is None else ("yes" if r.significant else "no")
    return dict(zip(cols, (r.ratio, r.low, r.high, verdict)))


def method_rows(cfg: DictConfig) -> list[dict]:
    """One row per variant: variant, method, quant, weights, seeds, ppl (seed 0) and its mean and std over
    seeds, the ratio to SpinQuant and to exact layer-wise (same quant and weight quantizer) with paired
    t-intervals over seeds and significance, each zero-shot task, zeroshot_avg (seed 0)."""
    names = list(cfg.variants)
    tables = seed_results(paths.metrics(cfg), names, list(cfg.report.get("seeds") or [0]))
    key = check_paired(tables)
    configs = {name: check_one_config(name, runs) for name, runs in tables.items()}
    nlls = {name: {run.seed: torch.tensor(run.windows["window_nll"], dtype=torch.float64) for run in runs}
            for name, runs in tables.items()}
    rows, zeroshot = [], []
    for name in names:
        result = tables[name][0].result  # seed 0
        mean, std = mean_std(torch.stack(list(nlls[name].values())))
        rows.append({"variant": name, "method": result["method"], "quant": result["quant"],
                     "weights": result.get("weights", "rtn"), "seeds": len(nlls[name]),
                     f"{key}_ppl": result[f"{key}_ppl"], f"{key}_ppl_mean": mean, f"{key}_ppl_std": std})
        zeroshot.append({**{task: result[task] for task in result.get("zeroshot_tasks", [])},
                         "zeroshot_avg": result.get("zeroshot_avg")})
    level = float(cfg.report.get("level", 0.95))
    ratios = [{k: v for method in REFERENCES
               for k, v in _ratio_columns(row, _reference(rows, row, method, configs), nlls, method, level).items()}
              for row in rows]
    return [{**row, **ratio, **tasks} for row, ratio, tasks in zip(rows, ratios, zeroshot)]


def _ratio_cell(row: dict, method: str) -> str:
    if row.get(f"ratio_vs_{method}") is None:
        return "–"
    if row[f"ratio_vs_{method}_ci_low"] is None:
        return f"{row[f'ratio_vs_{method}']:.3f} (1 seed)"
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
        " mean ± std: over the row's seeds (`python -m pipeline.tools.seed_runs`).",
        "- Ratios: ppl divided by the SpinQuant / exact layer-wise row of the same quant and weight quantizer,"
        " seed by seed, geometric mean over the seeds both rows have;"
        f" [{level:.0%} interval]: paired t-interval over those seeds (Student t, seeds - 1 degrees of freedom,"
        " on the per-seed log ratios); * = the interval excludes 1; one common seed: no interval, no verdict.",
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
    tables = seed_results(paths.metrics(cfg), list(cfg.variants), list(cfg.report.get("seeds") or [0]))
    for name, runs in tables.items():  # every run read was made under its variant's setting here
        check_made_under(name, runs, output_setting(select_variant(OmegaConf.merge(cfg, {"variant": name}))[1]))
    rows = method_rows(cfg)
    if not rows:
        raise PipelineError("variants is empty: nothing to report")
    sweeps = {}
    for name in cfg.get("rank_sweep", {}).get("variants") or {}:
        if paths.rank_sweep(cfg, name).is_file():
            with paths.rank_sweep(cfg, name).open() as f:
                sweeps[name] = list(csv.DictReader(f))
    out = Path(cfg.report.path)
    level = float(cfg.report.get("level", 0.95))
    matrix = matrix_markdown(matrix_rows(paths.cells_results(cfg), level), level)
    with stage_run(cfg, "report"):
        write_csv(paths.report_table(cfg), rows)
        with atomic_path(out) as tmp:
            tmp.write_text(markdown(cfg, rows, sweeps) + "\n## The experiment matrix (`python -m pipeline.tools.cells`)\n\n"
                           + matrix)
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(paths.report_table(cfg)))
