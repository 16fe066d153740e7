"""The matrix's results table: every (model, quant, weights) group of ``metrics/cells``, one row per variant.

``python -m pipeline.eval.cells_report [--results metrics/cells] [--out docs/results/matrix.md]``

Reads every result file ``pipeline.tools.cells`` wrote (``<results>/<model>/<quant>-<weights>/seed<k>/<variant>.json``),
pools a variant's seeds only when they were made under one configuration and on the same windows
(``results.check_one_config`` / ``check_paired``: one line naming both files otherwise), and gives per row
mean ± std of the seeds' perplexities and the ratio to SpinQuant and to exact layer-wise of the same group
(same model, quant and weight quantizer), seed-paired, with a paired t-interval over the common seeds
(``seed_stats.paired_ratio``); no interval and no verdict below 2 common seeds. The report stage of
``dvc repro`` appends the same table to ``results.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..infra.artifacts import atomic_path, write_csv
from ..infra.errors import PipelineError, cli_errors_as_one_line
from .results import SeedResult, check_one_config, check_paired
from .seed_stats import mean_std, paired_ratio

RESULTS_DIR = Path("metrics") / "cells"
REFERENCES = ("spinquant", "layerwise")
# row order in a group: baselines, then the trained methods, the paper's variant before ours
ORDER = ("rtn", "quarot", "spinquant", "layerwise", "respinquant", "respinquant_chained")

Group = tuple[str, str, str]  # (model, quant, weights)


def read_cells(results: Path) -> dict[Group, dict[str, list[SeedResult]]]:
    """``{(model, quant, weights): {variant: [SeedResult by seed]}}`` of every result file under ``results``."""
    groups: dict[Group, dict[str, list[SeedResult]]] = {}
    for path in sorted(results.glob("*/*/seed*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: not a readable result ({exc})") from None
        if "window_nll" not in data or "config" not in data:
            raise PipelineError(f"{path}: not a pipeline.tools.cells result (no window_nll/config)")
        windows = {"corpus": data["corpus"], "text_sha256": data["corpus_sha256"], "seqlen": data["seqlen"],
                   "window_nll": data["window_nll"]}
        run = SeedResult(int(data["seed"]), path, data, windows)
        groups.setdefault((data["model"], data["quant"], data["weights"]), {}).setdefault(data["variant"], []).append(run)
    for variants in groups.values():
        for runs in variants.values():
            runs.sort(key=lambda r: r.seed)
    return dict(sorted(groups.items()))


def _ratio(mine: dict[int, torch.Tensor], theirs: dict[int, torch.Tensor], level: float) -> dict:
    common = sorted(set(mine) & set(theirs))
    if not common:
        return {"ratio": None, "low": None, "high": None, "significant": None, "seeds": 0}
    r = paired_ratio(torch.stack([mine[s] for s in common]), torch.stack([theirs[s] for s in common]), level)
    verdict = None if r.significant is None else ("yes" if r.significant else "no")
    return {"ratio": r.ratio, "low": r.low, "high": r.high, "significant": verdict, "seeds": len(common)}


def matrix_rows(results: Path, level: float = 0.95) -> list[dict]:
    """One row per (group, variant): seeds, mean ± std ppl, ratios to the group's references."""
    rows = []
    for (model, quant, weights), variants in read_cells(results).items():
        check_paired(variants)
        for name, runs in variants.items():
            check_one_config(name, runs)
        nll = {name: {r.seed: torch.tensor(r.result["window_nll"], dtype=torch.float64) for r in runs}
               for name, runs in variants.items()}
        names = sorted(variants, key=lambda v: (ORDER.index(v) if v in ORDER else len(ORDER), v))
        for name in names:
            mean, std = mean_std(torch.stack(list(nll[name].values())))
            row = {"model": model, "quant": quant, "weights": weights, "variant": name,
                   "method": variants[name][0].result["method"], "seeds": " ".join(str(s) for s in sorted(nll[name])),
                   "windows": variants[name][0].result["windows"], "ppl_mean": mean, "ppl_std": std}
            for ref in REFERENCES:
                got = _ratio(nll[name], nll[ref], level) if ref in nll and ref != name else dict.fromkeys(
                    ("ratio", "low", "high", "significant", "seeds"))
                row.update({f"ratio_vs_{ref}": got["ratio"], f"ratio_vs_{ref}_ci_low": got["low"],
                            f"ratio_vs_{ref}_ci_high": got["high"], f"significant_vs_{ref}": got["significant"],
                            f"paired_seeds_vs_{ref}": got["seeds"]})
            rows.append(row)
    return rows


def _cell(row: dict, ref: str) -> str:
    ratio = row[f"ratio_vs_{ref}"]
    if ratio is None:
        return "–"
    if row[f"ratio_vs_{ref}_ci_low"] is None:
        return f"{ratio:.3f} (1 seed)"
    star = " *" if row[f"significant_vs_{ref}"] == "yes" else ""
    return f"{ratio:.3f} [{row[f'ratio_vs_{ref}_ci_low']:.3f}, {row[f'ratio_vs_{ref}_ci_high']:.3f}]{star}"


def matrix_markdown(rows: list[dict], level: float = 0.95) -> str:
    """The table as markdown, one section per (model, quant, weights) group."""
    if not rows:
        return "No matrix results yet: run `python -m pipeline.tools.cells`.\n"
    lines = [f"Each row pools the seeds listed (`python -m pipeline.tools.cells`, `conf/matrix.yaml`); ppl on "
             f"{rows[0]['windows']} WikiText-2 test windows of 2048 tokens, the same windows for every row. "
             f"Ratios: ppl over the SpinQuant / exact layer-wise row of the same group, paired seed by seed "
             f"(geometric mean over the common seeds), [{level:.0%} paired t-interval over those seeds]; "
             "* = the interval excludes 1; one common seed: no interval, no verdict."]
    group = None
    for row in rows:
        if (row["model"], row["quant"], row["weights"]) != group:
            group = (row["model"], row["quant"], row["weights"])
            lines += ["", f"**{row['model']}, {row['quant']}, {row['weights']} weights**", "",
                      "| variant | seeds | ppl mean ± std | vs spinquant | vs layerwise |", "|---|---|---|---|---|"]
        spread = f"{row['ppl_mean']:.2f}" + ("" if row["ppl_std"] is None else f" ± {row['ppl_std']:.2f}")
        lines.append(f"| {row['variant']} | {row['seeds']} | {spread} | {_cell(row, 'spinquant')} | "
                     f"{_cell(row, 'layerwise')} |")
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- matrix:begin -->", "<!-- matrix:end -->")


def replace_between_markers(text: str, body: str, where: str = "README.md") -> str:
    """``text`` with what lies between ``README_MARKERS`` replaced by ``body`` (the markers stay)."""
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise PipelineError(f"{where}: needs one {begin} line before one {end} line")
    head, rest = text.split(begin)
    return head + begin + "\n" + body.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS_DIR), help="pipeline.tools.cells' results folder")
    parser.add_argument("--out", default="docs/results/matrix.md", help="markdown table to write")
    parser.add_argument("--csv", default=None, help="also the rows as csv")
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--readme", default=None,
                        help="also put the table between this file's matrix:begin/end markers (README.md)")
    args = parser.parse_args(argv)

    def body(a: argparse.Namespace) -> None:
        rows = matrix_rows(Path(a.results), a.level)
        table = matrix_markdown(rows, a.level)
        readme = None
        if a.readme:  # checked before anything is written
            readme = replace_between_markers(Path(a.readme).read_text(), table, a.readme)
        with atomic_path(a.out) as tmp:
            tmp.write_text("# The experiment matrix\n\n" + table)
        if readme is not None:
            with atomic_path(a.readme) as tmp:
                tmp.write_text(readme)
        if a.csv:
            write_csv(a.csv, rows)
        print(f"{len(rows)} row(s) -> {a.out}")

    cli_errors_as_one_line(body, args)


if __name__ == "__main__":
    main()
