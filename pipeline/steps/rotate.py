"""rotate_global: the method's global rotations (QuaRot: seeded random Hadamards, no training)."""
from __future__ import annotations

import json

import mlflow
from omegaconf import DictConfig, OmegaConf

from .. import paths
from ..artifacts import save_tensors
from ..config import select_variant
from ..methods import MethodSpec, make_rotations
from ..models import load_model, model_fingerprint
from ..tracking import stage_run


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    method = MethodSpec.from_cfg(cfg.method)
    model, _ = load_model(cfg.model)
    with stage_run(cfg, "rotate_global", name):
        rotations = make_rotations(method, model)
        out = paths.rotations(cfg, name)
        save_tensors(out, rotations, {
            "fingerprint": model_fingerprint(model), "model": cfg.model.name, "method": method.name,
            "method_config": json.dumps(OmegaConf.to_container(cfg.method, resolve=True)),
        })
        mlflow.log_metrics({"n_rotations": len(rotations), "train_steps": 0})
        mlflow.log_artifact(str(out))
