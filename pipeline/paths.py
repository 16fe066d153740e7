"""Where each stage reads and writes (relative to the working dir: the repo root under DVC)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def artifacts(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts)


def metrics(cfg: DictConfig) -> Path:
    return Path(cfg.paths.metrics)


def calib_windows(cfg: DictConfig) -> Path:
    return artifacts(cfg) / "calib" / "windows.safetensors"


def rotations(cfg: DictConfig, name: str) -> Path:
    return artifacts(cfg) / "rotations" / name / "global.safetensors"


def fused(cfg: DictConfig, name: str) -> Path:
    return artifacts(cfg) / "fused" / name


def act_stats(cfg: DictConfig, name: str) -> Path:
    """Per-linear activation statistics; ``name`` is ``original`` or a variant."""
    return metrics(cfg) / "act_stats" / f"{name}.csv"


def eval_metrics(cfg: DictConfig, name: str) -> Path:
    return metrics(cfg) / "eval" / f"{name}.json"
