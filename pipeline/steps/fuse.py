"""fuse: fold norms and rotations into the weights, attach the online ops (R3, R4, transitions),
quantize the weights (RTN or GPTQ), export the packed checkpoint."""
from __future__ import annotations

import resource
import time

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..act_stats import activation_stats, summarize_stats
from ..artifacts import load_tensors, write_csv
from ..checkpoint import CONFIG, save_quantized
from ..config import select_variant
from ..errors import PipelineError
from ..methods import MethodSpec, prepare_model, quant_spec
from ..models import load_model, model_fingerprint
from ..subspace import rotation_digest
from ..tracking import stage_run


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    method, quant = MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant)
    model, tok = load_model(cfg.model)
    fingerprint = model_fingerprint(model)
    stage = "layerwise" if method.per_layer else "global"
    rotations, _ = load_tensors(paths.rotations(cfg, cfg.sources[stage], stage), fingerprint)
    subspace = None
    if method.transition == "low_rank":
        sub_path = paths.subspace(cfg, cfg.sources["subspace"])
        subspace, meta = load_tensors(sub_path, fingerprint)
        if meta.get("rotations") != rotation_digest(rotations):
            raise PipelineError(f"{sub_path} was made from other rotations: rerun the approximate stage")
    windows, _ = load_tensors(paths.calib_windows(cfg), fingerprint)
    windows = windows["windows"]
    with stage_run(cfg, "fuse", name):
        start = time.perf_counter()
        prepare_model(model, method, rotations, quant, subspace, windows)
        fuse_seconds = time.perf_counter() - start
        rows = activation_stats(model, windows[: cfg.calib.stats_windows])
        write_csv(paths.act_stats(cfg, name), rows)
        save_quantized(paths.fused(cfg, name), model, tok, method, quant, fingerprint,
                       {"model_name": cfg.model.name, "variant": name})
        mlflow.log_metrics({**summarize_stats(rows), "fuse_seconds": fuse_seconds,
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        mlflow.log_artifact(str(paths.act_stats(cfg, name)))
        mlflow.log_artifact(str(paths.fused(cfg, name) / CONFIG))  # the weights stay in DVC's cache
