"""MLflow logging for stages: one run per stage invocation, with the resolved config as params.

Tracking URI: ``mlflow.tracking_uri`` if set, else env ``MLFLOW_TRACKING_URI``, else a sqlite DB
``mlflow.db`` in the repo root (``mlflow ui --backend-store-uri sqlite:///mlflow.db``).
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from .config import REPO_ROOT



def _flatten(node: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def tracking_uri(cfg: DictConfig) -> str:
    return (
        cfg.get("mlflow", {}).get("tracking_uri")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    )


@contextmanager
def stage_run(cfg: DictConfig, stage: str, name: str | None = None) -> Iterator[object]:
    """Start an MLflow run for ``stage`` (and variant ``name``), log the resolved config, yield the run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.get("mlflow", {}).get("experiment") or "respinquant")
    container = OmegaConf.to_container(cfg, resolve=True)
    tags = {
        "stage": stage,
        "variant": name or "",
        "model": str(cfg.model.name),
        "git_commit": _git_commit(),
    }
    if "method" in cfg:
        tags["method"] = str(cfg.method.name)
    if "quant" in cfg:
        tags["quant"] = str(cfg.quant.name)
    with mlflow.start_run(run_name=f"{stage}/{name}" if name else stage, tags=tags) as run:
        mlflow.log_params(_flatten(container))
        yield run
