"""MLflow logging for stages: one run per stage invocation, with the resolved config as params.

Tracking URI: ``mlflow.tracking_uri`` if set, else env ``MLFLOW_TRACKING_URI``, else a sqlite DB
``mlflow.db`` in the repo root (``mlflow ui --backend-store-uri sqlite:///mlflow.db``).

Every run is tagged ``stage``, ``variant``, ``method``, ``model``, ``quant``, ``weights``,
``git_commit`` and ``pipeline_run``: env ``RSQ_PIPELINE_RUN`` if set, else
``<commit[:8]>[+dirty]-<digest of the settings all stages of one dvc repro share>``, so the stages of
one ``dvc repro`` carry one id and the UI can group and compare them by it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from .artifacts import output_lock
from .config import REPO_ROOT
from .errors import PipelineError
from .settings import quant_label


def _flatten(node: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


# Settings every stage of one `dvc repro` composes identically (stages differ only in variant and
# rotation_stage; their `variants` holds every method); hand runs (no `variants`) add their method/quant/approx.
_SHARED = ("model", "data", "train", "calib", "eval", "seed", "variants", "paths")
_HAND_RUN = ("method", "quant", "approx")
_CODE = ("pipeline", "stages", "conf", "dvc.yaml")


def pipeline_run_id(cfg: DictConfig, commit: str) -> str:
    """The tag that groups the stage runs of one pipeline run (module doc)."""
    if os.environ.get("RSQ_PIPELINE_RUN"):
        return os.environ["RSQ_PIPELINE_RUN"]
    keys = _SHARED + (() if "variants" in cfg else _HAND_RUN)
    shared = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
              for k in keys if k in cfg}
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:8]
    # code only: dvc.lock and metrics/ change while a dvc repro runs
    dirty = "+dirty" if _git("status", "--porcelain", "--untracked-files=no", "--", *_CODE) else ""
    return f"{commit[:8]}{dirty}-{digest}"


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

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # two stages starting at once on a fresh sqlite store would both create and migrate its tables
    # (the loser died in alembic): the first one to take the lock does it, the other finds it done
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    with output_lock(db) if db is not None else nullcontext():
        try:
            mlflow.set_experiment(cfg.get("mlflow", {}).get("experiment") or "respinquant")
        except mlflow.exceptions.MlflowException as exc:  # an unusable store: say which, in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"mlflow.tracking_uri={uri}: MLflow cannot use this store ({first[:300]}); "
                                f"use a sqlite:/// or http(s):// URI") from None
    container = OmegaConf.to_container(cfg, resolve=True)
    commit = _git_commit()
    tags = {
        "stage": stage,
        "variant": name or "",
        "model": str(cfg.model.name),
        "git_commit": commit,
        "pipeline_run": pipeline_run_id(cfg, commit),
        "seed": str(cfg.get("seed", 0)),
    }
    if "method" in cfg:
        tags["method"] = str(cfg.method.name)
    if "quant" in cfg:
        tags["quant"] = quant_label(cfg.quant)  # from the fields: a hand override of a bit-width shows
        tags["weights"] = str(cfg.quant.get("weight_method", "rtn"))
    run_name = f"{stage}/{name}" if name else stage
    if cfg.get("seed", 0):  # a seed run (pipeline.tools.seed_runs): its runs group by variant and seed
        run_name += f"/seed{cfg.seed}"
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(_flatten(container))
        yield run
