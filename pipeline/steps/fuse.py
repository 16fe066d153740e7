"""fuse: fold norms and rotations into the weights, quantize them, attach the online ops, export."""
from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..act_stats import activation_stats, summarize_stats
from ..artifacts import load_tensors, write_csv
from ..checkpoint import CONFIG, save_fused
from ..config import select_variant
from ..methods import MethodSpec, prepare_model, quant_spec
from ..models import load_model, model_fingerprint
from ..tracking import stage_run


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    method, quant = MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant)
    model, _ = load_model(cfg.model)
    fingerprint = model_fingerprint(model)
    rotations, _ = load_tensors(paths.rotations(cfg, name, "layerwise" if method.per_layer else "global"), fingerprint)
    windows, _ = load_tensors(paths.calib_windows(cfg), fingerprint)
    with stage_run(cfg, "fuse", name):
        prepare_model(model, method, rotations, quant)
        rows = activation_stats(model, windows["windows"][: cfg.calib.stats_windows])
        write_csv(paths.act_stats(cfg, name), rows)
        save_fused(paths.fused(cfg, name), model, method, quant, cfg.model, fingerprint)
        mlflow.log_metrics(summarize_stats(rows))
        mlflow.log_artifact(str(paths.act_stats(cfg, name)))
        mlflow.log_artifact(str(paths.fused(cfg, name) / CONFIG))  # the weights stay in DVC's cache
