"""Where each stage reads and writes (relative to the working dir: the repo root under DVC)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from . import settings


def artifacts(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts)


def metrics(cfg: DictConfig) -> Path:
    return Path(cfg.paths.metrics)


def calib_windows(cfg: DictConfig) -> Path:
    """The calibration windows, named by the tag of their setting (model, text, count, length, seed), so
    calibrations under other settings (a hand run with another seed, say) sit side by side."""
    return artifacts(cfg) / "calib" / f"windows-{settings.setting_tag(settings.calib_setting(cfg))}.safetensors"


def rotations(cfg: DictConfig, name: str, stage: str = "global") -> Path:
    """The rotation set of a variant: ``stage`` is ``global`` or ``layerwise``."""
    return artifacts(cfg) / "rotations" / name / f"{stage}.safetensors"


def subspace(cfg: DictConfig, name: str) -> Path:
    """The approximate stage's ``Q``/``M`` set, inside the variant's rotation folder (fuse reads it)."""
    return artifacts(cfg) / "rotations" / name / "subspace.safetensors"


def approx_metrics(cfg: DictConfig, name: str) -> Path:
    """Per-transition rank, energy and error (csv); the summary goes beside it as ``.json``."""
    return metrics(cfg) / "approx" / f"{name}.csv"


def train_checkpoint(cfg: DictConfig, name: str, stage: str) -> Path:
    """Resumable training state; outside DVC's outs (DVC clears outs before a stage reruns)."""
    return artifacts(cfg) / "checkpoints" / name / f"{stage}.safetensors"


def loss_curve(cfg: DictConfig, name: str, stage: str) -> Path:
    return metrics(cfg) / "train" / f"{name}_{stage}.csv"


def fused(cfg: DictConfig, name: str) -> Path:
    return artifacts(cfg) / "fused" / name


def act_stats(cfg: DictConfig, name: str) -> Path:
    """Per-linear activation statistics; ``name`` is ``original`` or a variant."""
    return metrics(cfg) / "act_stats" / f"{name}.csv"


def eval_metrics(cfg: DictConfig, name: str) -> Path:
    return metrics(cfg) / "eval" / f"{name}.json"


def eval_windows(cfg: DictConfig, name: str) -> Path:
    """Each evaluation window's mean NLL of a variant (json; the report pairs variants window by window)."""
    return metrics(cfg) / "eval_windows" / f"{name}.json"


def seed_metrics(cfg: DictConfig, seed: int) -> Path:
    """The metrics folder of a seed run (``pipeline.tools.seed_runs``): ``<metrics>/seeds/seed<k>``."""
    return metrics(cfg) / "seeds" / f"seed{seed}"


def cells_results(cfg: DictConfig) -> Path:
    """The experiment matrix's results (``pipeline.tools.cells``): ``<metrics>/cells/<model>/<quant>-<weights>/seed<k>/``."""
    return metrics(cfg) / "cells"


def rank_sweep(cfg: DictConfig, name: str) -> Path:
    """WikiText-2 ppl of a low-rank variant at each ``rank_sweep.ranks`` value (csv)."""
    return metrics(cfg) / "rank_sweep" / f"{name}.csv"


def report_table(cfg: DictConfig) -> Path:
    """One row per compared variant: ppl and zero-shot accuracies (csv, DVC's per-method plots)."""
    return metrics(cfg) / "report" / "methods.csv"


def bench_metrics(cfg: DictConfig) -> Path:
    """The kernel benchmark's rows (device, op, model, shape, M, ms, speedup)."""
    return metrics(cfg) / "bench.json"
