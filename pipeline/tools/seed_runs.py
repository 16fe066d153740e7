"""Seed runs: the default pipeline's variants again under other seeds, for the report's intervals.

``python -m pipeline.tools.seed_runs --seeds 1 2 [--variants spinquant layerwise respinquant ...] [overrides]``

A seed (the top-level ``seed``) draws the calibration sample, the random Hadamard signs (``method.seed``)
and the training batch order (``train.seed``). Seed 0 is what ``dvc repro`` makes; each further seed k
composes ``conf/pipeline.yaml`` with ``seed=k`` (and the overrides), writes it to
``runs/seeds/seed<k>/params.yaml`` and runs the stage scripts a chosen variant needs, in DVC's order
(calibrate, the training stages of its sources, approximate, fuse, eval), with the artifacts under
``runs/seeds/seed<k>/artifacts`` and the metrics under ``metrics/seeds/seed<k>``. The report stage then
reads every seed it finds there (``report.seeds``). MLflow tags each run with its ``seed``; the runs of
one seed share a ``pipeline_run`` id, so the UI groups a variant's seed runs by ``variant`` and ``seed``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf, open_dict

from ..infra.config import REPO_ROOT, compose_pipeline, select_variant
from ..infra.errors import PipelineError, cli_errors_as_one_line

SEED_DIR = Path("runs") / "seeds"
DEFAULT_VARIANTS = ("spinquant", "layerwise", "respinquant", "respinquant_chained")


def seed_config(seed: int, overrides: list[str]):
    """The composed pipeline config of seed run ``seed`` (its paths under the seed's folders)."""
    cfg = compose_pipeline([*overrides, f"seed={seed}"])
    with open_dict(cfg):
        cfg.paths.artifacts = str(SEED_DIR / f"seed{seed}" / "artifacts")
        cfg.paths.metrics = str(Path(cfg.paths.metrics) / "seeds" / f"seed{seed}")
    return cfg


def stage_plan(cfg, variants: list[str]) -> list[tuple[str, list[str]]]:
    """``[(stage script, its overrides), ...]`` that make and evaluate ``variants``, in DVC's order."""
    unknown = [v for v in variants if v not in cfg.variants]
    if unknown:
        raise PipelineError(f"--variants {' '.join(unknown)}: not in variants ({', '.join(cfg.variants)})")
    rotate_global, rotate_layerwise, approximate = [], [], []
    for name in variants:
        sources = select_variant(OmegaConf.merge(cfg, {"variant": name}))[1].sources
        if sources["global"] in cfg.global_variants and sources["global"] not in rotate_global:
            rotate_global.append(sources["global"])
        layerwise = sources["layerwise"]
        if cfg.variants[name].method.per_layer:
            parent = cfg.layerwise_variants.get(layerwise)
            if parent is not None and parent not in rotate_global:
                rotate_global.append(parent)
            if parent is not None and layerwise not in rotate_layerwise:
                rotate_layerwise.append(layerwise)
        if name in cfg.approx_variants:
            approximate.append(name)
    plan: list[tuple[str, list[str]]] = [("calibrate", [])]
    plan += [("train_rotation", [f"variant={v}", "rotation_stage=global"]) for v in rotate_global]
    plan += [("train_rotation", [f"variant={v}", "rotation_stage=layerwise"]) for v in rotate_layerwise]
    plan += [("approximate", [f"variant={v}"]) for v in approximate]
    plan += [("fuse", [f"variant={v}"]) for v in variants]
    plan += [("eval", [f"variant={v}"]) for v in variants]
    return plan


def run_seed(seed: int, variants: list[str], overrides: list[str]) -> None:
    """Compose, write and run seed ``seed``'s stages (module doc); a failing stage stops it (exit 2)."""
    cfg = seed_config(seed, overrides)
    plan = stage_plan(cfg, variants)
    folder = REPO_ROOT / SEED_DIR / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False))
    for i, (stage, args) in enumerate(plan, 1):
        print(f"seed {seed} [{i}/{len(plan)}] {stage} {' '.join(args)}", flush=True)
        cmd = [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), "-cd", str(folder), "-cn", "params", *args]
        if subprocess.run(cmd, cwd=REPO_ROOT).returncode != 0:
            raise PipelineError(f"seed {seed}: stage {stage} {' '.join(args)} failed (its message is above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds to run, >= 1 (seed 0 is dvc repro's)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="variants of conf/pipeline.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pipeline.yaml")
    args = parser.parse_args(argv)
    # `--variants a b key=value ...`: argparse hands the overrides after the list to --variants
    def is_override(v: str) -> bool:  # key=value, ~key (delete) or +key=value
        return "=" in v or v.startswith("~")

    args.overrides = [v for v in args.variants if is_override(v)] + args.overrides
    args.variants = [v for v in args.variants if not is_override(v)]

    def body(a: argparse.Namespace) -> None:
        if any(s < 1 for s in a.seeds):
            raise PipelineError(f"--seeds {' '.join(map(str, a.seeds))}: give seeds >= 1 (seed 0 is what dvc repro makes)")
        for seed in dict.fromkeys(a.seeds):
            run_seed(seed, a.variants, a.overrides)

    cli_errors_as_one_line(body, args)


if __name__ == "__main__":
    main()
