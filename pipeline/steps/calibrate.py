"""calibrate: tokenize calibration text, sample windows, and record the original model's outliers.

The statistics are taken layer-sequentially (``act_stats.activation_stats_streamed``): the model's
weights are read one decoder layer at a time, so a model larger than memory is calibrated too."""
from __future__ import annotations

from omegaconf import DictConfig

from ..infra import devices, paths
from ..eval.act_stats import activation_stats_streamed, summarize_stats
from ..infra.artifacts import save_tensors, write_csv, write_json
from ..eval.data import calibration_text, check_seqlen, sample_windows, text_digest, tokenize
from ..infra.errors import PipelineError
from ..infra.settings import SETTING_KEY, calib_setting, record
from ..model.load import max_positions, model_fingerprint
from ..model.streaming import SourceLayers, open_model
from ..infra.tracking import stage_run


def run(cfg: DictConfig) -> None:
    import mlflow

    if not 1 <= cfg.calib.stats_windows <= cfg.calib.n_windows:
        raise PipelineError(f"calib.stats_windows={cfg.calib.stats_windows}: must be 1..calib.n_windows")
    device, dtype = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    model, tok, source = open_model(cfg.model, dtype)
    check_seqlen(cfg.calib.seqlen, max_positions(model), "calib.seqlen")
    fingerprint = model_fingerprint(model)
    with stage_run(cfg, "calibrate"):
        text = calibration_text(cfg.data)
        ids = tokenize(text, tok)
        windows = sample_windows(ids, cfg.calib.n_windows, cfg.calib.seqlen, cfg.seed)
        layers = SourceLayers(model, source, device)
        layers.load_head()
        rows = activation_stats_streamed(model, layers, windows[: cfg.calib.stats_windows])
        save_tensors(
            paths.calib_windows(cfg), {"windows": windows},
            {"fingerprint": fingerprint, "model": cfg.model.name, "source": cfg.data.calib_source,
             SETTING_KEY: record(calib_setting(cfg))},
        )
        write_csv(paths.act_stats(cfg, "original"), rows)
        metrics = {"calib_tokens_available": ids.numel(), "calib_windows": windows.shape[0],
                   "calib_seqlen": windows.shape[1], **summarize_stats(rows)}
        write_json(paths.metrics(cfg) / "calibrate.json", {**metrics, "calib_text_sha256": text_digest(text)})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(paths.act_stats(cfg, "original")))
