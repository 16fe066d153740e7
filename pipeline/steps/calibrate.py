"""calibrate: tokenize calibration text, sample windows, and record the original model's outliers."""
from __future__ import annotations

import mlflow
import torch
from omegaconf import DictConfig

from .. import paths
from ..act_stats import activation_stats
from ..artifacts import save_tensors, write_csv, write_json
from ..data import calibration_text, sample_windows, tokenize
from ..models import load_model, model_fingerprint
from ..tracking import stage_run


def summarize_stats(rows: list[dict]) -> dict[str, float]:
    """Model-level summary of ``activation_stats`` rows."""
    t = {k: torch.tensor([r[k] for r in rows]) for k in ("absmax", "kurtosis", "max_median_ratio")}
    return {
        "act_absmax_max": t["absmax"].max().item(),
        "act_kurtosis_mean": t["kurtosis"].mean().item(),
        "act_max_median_ratio_mean": t["max_median_ratio"].mean().item(),
    }


def run(cfg: DictConfig) -> None:
    model, tok = load_model(cfg.model)
    fingerprint = model_fingerprint(model)
    with stage_run(cfg, "calibrate"):
        ids = tokenize(calibration_text(cfg.data), tok)
        windows = sample_windows(ids, cfg.calib.n_windows, cfg.calib.seqlen, cfg.seed)
        save_tensors(
            paths.calib_windows(cfg), {"windows": windows},
            {"fingerprint": fingerprint, "model": cfg.model.name, "source": cfg.data.calib_source},
        )
        rows = activation_stats(model, windows[: cfg.calib.stats_windows])
        write_csv(paths.act_stats(cfg, "original"), rows)
        metrics = {"calib_tokens_available": ids.numel(), "calib_windows": windows.shape[0],
                   "calib_seqlen": windows.shape[1], **summarize_stats(rows)}
        write_json(paths.metrics(cfg) / "calibrate.json", metrics)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(paths.act_stats(cfg, "original")))
