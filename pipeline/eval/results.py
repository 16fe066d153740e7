"""Recorded results of a variant over seeds, and the checks that make pooling them honest.

A row of a results table pools one variant's runs under several seeds. It may do so only when the runs
were made under one configuration (``check_one_config``: everything but the keys named in ``POOLED``
agrees) and evaluated on the same windows of the same text (``check_paired``). ``steps/report.py``
(``dvc repro``'s layout) and ``cells_report.py`` (the matrix's) read their files into ``SeedResult``s
and call these.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..infra.errors import PipelineError
from ..infra.settings import differences, flat

# what may differ between the runs one row pools: the seed is the point, the rest says where, when and
# how (layer by layer or whole) the same configuration ran; everything else (model, method, quant, weight
# quantizer, dtype, ...) must agree
POOLED = frozenset({"seed", "commit", "wall_time", "wall_seconds", "layer_sequential"})


class SeedResult(NamedTuple):
    """One recorded evaluation of a variant: its seed, its eval json (``path``) and its per-window NLLs."""

    seed: int
    path: Path
    result: dict
    windows: dict


def run_config(run: SeedResult) -> dict:
    """The configuration a run was made under as ``{"dotted.key": value}``, less every key named in
    ``POOLED`` at any depth (a seed reaches ``train.seed`` and every ``method.seed`` too): its eval json's
    ``config`` where it records one, else the fields an eval json has always recorded."""
    config = run.result.get("config")
    if config is None:
        config = {"method": run.result["method"], "quant": run.result["quant"],
                  "weights": run.result.get("weights", "rtn"), "corpus": run.result.get("corpus")}
    return _unpooled(flat(config))


def _unpooled(config: dict) -> dict:
    return {k: v for k, v in config.items() if k.rsplit(".", 1)[-1] not in POOLED}


def check_made_under(name: str, runs: list[SeedResult], expected: dict) -> None:
    """Every run of variant ``name`` was made under ``expected`` (``settings.output_setting`` of the
    variant in the reader's config), the keys of ``POOLED`` aside: one line naming the file and both
    values if not. A run that records no setting was made by an older version: rerun its eval."""
    want = _unpooled(flat(expected))
    for run in runs:
        if "config" not in run.result:
            raise PipelineError(f"{run.path} records no setting (made by an older version): rerun the eval "
                                f"stage of variant {name}")
        diff = differences(run_config(run), want)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise PipelineError(f"{run.path} was made under another setting than variant {name}'s: {shown}: "
                                "rerun its stages")


def check_one_config(name: str, runs: list[SeedResult]) -> dict:
    """The runs a row pools were made under one configuration (one line naming both files if not); it."""
    first = run_config(runs[0])
    for run in runs[1:]:
        other = run_config(run)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise PipelineError(f"{runs[0].path} and {run.path} differ in {key} ({first.get(key)!r} vs "
                                    f"{other.get(key)!r}): variant {name} pools only runs of one configuration")
    return first


def check_paired(tables: dict[str, list[SeedResult]]) -> str:
    """Every variant and seed was evaluated on the same windows of the same text; its metric prefix."""
    def signature(data: dict) -> tuple:
        return data["corpus"], data["text_sha256"], data["seqlen"], len(data["window_nll"])

    runs = [(name, run.seed, signature(run.windows)) for name, by_seed in tables.items() for run in by_seed]
    first = runs[0]
    for other in runs[1:]:
        if other[2] != first[2]:
            raise PipelineError(f"variants {first[0]} (seed {first[1]}) and {other[0]} (seed {other[1]}) were "
                                f"evaluated on different windows ({first[2][0]} x{first[2][3]} vs "
                                f"{other[2][0]} x{other[2][3]}): rerun eval")
    return "wikitext2" if first[2][0] == "wikitext2" else "corpus"


