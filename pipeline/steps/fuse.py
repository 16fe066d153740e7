"""fuse: fold norms and rotations into the weights, attach the online ops (R3, R4, transitions),
quantize the weights (RTN or GPTQ), export the packed checkpoint, one decoder layer at a time
(``fuse.streamed``: the model's weights are read from safetensors layer by layer, so a model larger
than memory goes through)."""
from __future__ import annotations

import resource
import time

from omegaconf import DictConfig

from ..infra import paths
from ..eval.act_stats import summarize_stats
from ..infra.artifacts import open_tensors, write_csv
from ..export.checkpoint import CONFIG
from ..infra.config import select_variant
from ..infra.devices import setup
from ..infra.errors import PipelineError
from ..infra.settings import (SETTING_KEY, calib_windows, check_setting, load_checked, output_setting,
                              rotation_setting, subspace_setting)
from ..methods import MethodSpec, quant_spec
from ..model.load import model_fingerprint
from ..fuse.streamed import fuse_streamed
from ..model.streaming import open_model
from ..rotation.subspace import check_subspace_variant, rotation_digest
from ..infra.tracking import stage_run


def run(cfg: DictConfig) -> None:
    import mlflow

    name, cfg = select_variant(cfg)
    device, dtype = setup(cfg.get("device"), cfg.model.get("dtype"))
    method, quant = MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant)
    model, tok, source = open_model(cfg.model, dtype)
    fingerprint = model_fingerprint(model)
    stage = "layerwise" if method.per_layer else "global"
    rot_path = paths.rotations(cfg, cfg.sources[stage], stage)
    rotations, rot_meta = open_tensors(rot_path, fingerprint)
    check_setting(rot_path, rot_meta.get(SETTING_KEY), rotation_setting(cfg, stage),
                  f"rerun rotate_{stage} of {cfg.sources[stage]} with this run's settings")
    subspace = None
    if method.transition == "low_rank":
        sub_path = paths.subspace(cfg, cfg.sources["subspace"])
        subspace, meta = load_checked(sub_path, fingerprint, subspace_setting(cfg),
                                      "rerun approximate with this run's settings")
        if meta.get("rotations") != rotation_digest(rotations):
            raise PipelineError(f"{sub_path} was made from other rotations: rerun the approximate stage")
        check_subspace_variant(meta, method.chained, sub_path)
    windows = calib_windows(paths.calib_windows(cfg), cfg, fingerprint)
    with stage_run(cfg, "fuse", name):
        start = time.perf_counter()
        rows = fuse_streamed(paths.fused(cfg, name), model, tok, source, method, rotations, quant, fingerprint,
                             subspace, windows, windows[: cfg.calib.stats_windows], device,
                             {"model_name": cfg.model.name, "variant": name,
                              SETTING_KEY: output_setting(cfg)})
        fuse_seconds = time.perf_counter() - start
        write_csv(paths.act_stats(cfg, name), rows)
        mlflow.log_metrics({**summarize_stats(rows), "fuse_seconds": fuse_seconds,
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        mlflow.log_artifact(str(paths.act_stats(cfg, name)))
        mlflow.log_artifact(str(paths.fused(cfg, name) / CONFIG))  # the weights stay in DVC's cache
