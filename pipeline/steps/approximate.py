"""approximate: the residual subspace (Q, M) of every transition of a trained per-layer rotation set."""
from __future__ import annotations

import json

import torch
from omegaconf import DictConfig, OmegaConf

from ..infra import devices, paths
from ..infra.artifacts import open_tensors, save_tensors, write_csv, write_json
from ..infra.config import select_variant
from ..infra.errors import PipelineError
from ..infra.settings import SETTING_KEY, check_setting, record, rotation_setting, subspace_setting
from ..methods import MethodSpec, check_rotations
from ..model.load import model_fingerprint
from ..model.streaming import open_model
from ..rotation.subspace import SUBSPACE_CHAINED, ApproxSpec, approximate_rotations, rotation_digest, summarize
from ..infra.tracking import stage_run


def run(cfg: DictConfig) -> None:
    import mlflow

    name, cfg = select_variant(cfg)
    method = MethodSpec.from_cfg(cfg.method)
    if method.transition != "low_rank":
        raise PipelineError(f"method {method.name} has no low-rank transitions: approximate does not apply")
    spec = ApproxSpec.from_cfg(cfg.approx)
    device, dtype = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    model, _, _ = open_model(cfg.model, dtype)  # the skeleton: sizes and fingerprint, no weights read
    fingerprint = model_fingerprint(model)
    dims = model.config
    spec.check_hidden(dims.hidden_size, model=cfg.model.name)
    rot_path = paths.rotations(cfg, cfg.sources["layerwise"], "layerwise")
    rotations, rot_meta = open_tensors(rot_path, fingerprint)
    check_setting(rot_path, rot_meta.get(SETTING_KEY), rotation_setting(cfg, "layerwise"),
                  f"rerun rotate_layerwise of {cfg.sources['layerwise']} with this run's settings")
    check_rotations(rotations, method, model)
    with stage_run(cfg, "approximate", name):
        # the float64 eigh/SVD math runs on the device (factory calls inside default to it too), one
        # basis read from disk at a time
        with device:
            tensors, rows = approximate_rotations(rotations, dims.num_hidden_layers, spec, device=device,
                                                  chained=method.chained)
        summary = summarize(rows)
        meta = {"fingerprint": fingerprint, "model": cfg.model.name, "rotations": rotation_digest(rotations),
                "approx": json.dumps(OmegaConf.to_container(cfg.approx, resolve=True)),
                SUBSPACE_CHAINED: json.dumps(method.chained), SETTING_KEY: record(subspace_setting(cfg))}
        save_tensors(paths.subspace(cfg, cfg.sources["subspace"]), {k: v.to("cpu", torch.float32) for k, v in tensors.items()}, meta)
        csv_path = paths.approx_metrics(cfg, name)
        write_csv(csv_path, rows)
        write_json(csv_path.with_suffix(".json"), {"rank": spec.label, "chained": method.chained, **summary})
        mlflow.log_params({"approx_rank": spec.label, "approx_energy": spec.energy, "approx_chained": method.chained})
        mlflow.log_metrics({k: v for k, v in summary.items() if v is not None})
        mlflow.log_artifact(str(csv_path))
