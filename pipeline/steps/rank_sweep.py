"""rank_sweep: WikiText-2 ppl of a ReSpinQuant variant against the subspace rank r (the ppl-vs-rank plot).

For each ``rank_sweep.ranks`` value the variant's per-layer set is approximated at that rank, fused in
memory with the variant's method and quant (no checkpoint written; ``rank_sweep.stream``: layer by
layer through a temporary checkpoint when the model does not fit, ``fused_ppl``) and evaluated on the
first ``rank_sweep.max_windows`` WikiText-2 test windows of ``eval.seqlen`` tokens. The weights are
quantized with ``rank_sweep.weight_method`` (default ``rtn``; null = the variant's own): the sweep is a
diagnostic of the transition's rank, and six GPTQ fuses would cost the default ``dvc repro`` ~15 min.
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from ..infra import devices, paths
from ..infra.artifacts import load_tensors, write_csv
from ..infra.config import select_variant
from ..eval.data import check_seqlen, wikitext2_windows
from ..infra.errors import PipelineError
from ..infra.settings import SETTING_KEY, calib_windows, check_setting, rotation_setting
from ..fuse.fused_ppl import fused_perplexity, should_stream
from ..methods import MethodSpec, check_rotations, quant_spec
from ..model.load import max_positions, model_fingerprint
from ..model.streaming import open_model
from ..rotation.subspace import ApproxSpec, approximate_rotations, summarize
from ..infra.tracking import stage_run


def run(cfg: DictConfig) -> None:
    import mlflow

    name, cfg = select_variant(cfg)
    method = MethodSpec.from_cfg(cfg.method)
    weights = cfg.rank_sweep.get("weight_method") or cfg.quant.weight_method
    quant = quant_spec({**OmegaConf.to_container(cfg.quant, resolve=True), "weight_method": weights})
    if method.transition != "low_rank":
        raise PipelineError(f"rank_sweep needs a low-rank (respinquant) variant; {name} uses method {method.name}")
    specs = [ApproxSpec.from_cfg({"rank": r, "energy": cfg.approx.energy}) for r in cfg.rank_sweep.ranks]
    if not specs:
        raise PipelineError("rank_sweep.ranks is empty")
    device, dtype = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    stream = should_stream(cfg.rank_sweep.get("stream", "auto"), "rank_sweep.stream", cfg.model, device, dtype)
    model, tok, _ = open_model(cfg.model, dtype)  # the skeleton: sizes and fingerprint, no weights read
    check_seqlen(cfg.eval.seqlen, max_positions(model), "eval.seqlen")
    fingerprint = model_fingerprint(model)
    n_layers = model.config.num_hidden_layers
    rot_path = paths.rotations(cfg, cfg.sources["layerwise"], "layerwise")
    rotations, rot_meta = load_tensors(rot_path, fingerprint)
    check_setting(rot_path, rot_meta.get(SETTING_KEY), rotation_setting(cfg, "layerwise"),
                  f"rerun rotate_layerwise of {cfg.sources['layerwise']} with this run's settings")
    check_rotations(rotations, method, model)
    for spec in specs:  # refuse a bad rank before the first (minutes-long) fuse
        spec.check_hidden(model.config.hidden_size, f"rank_sweep.ranks: {spec.rank}")
    del model
    windows, _ = wikitext2_windows(cfg.data, tok, cfg.eval.seqlen, cfg.rank_sweep.max_windows)
    windows = windows.to(device)  # fed to the model as they are
    calib = calib_windows(paths.calib_windows(cfg), cfg, fingerprint).to(device) if quant.weight_method == "gptq" else None
    rows = []
    with stage_run(cfg, "rank_sweep", name):
        mlflow.log_param("layer_sequential", stream)
        for spec in specs:
            start = time.perf_counter()
            tensors, transition_rows = approximate_rotations(rotations, n_layers, spec, progress=False,
                                                             chained=method.chained)
            summary = summarize(transition_rows)
            subspace = {k: v.to(torch.float32) for k, v in tensors.items()}
            ppl = fused_perplexity(cfg.model, method, rotations, quant, subspace, calib, windows, device, dtype,
                                   stream, desc=f"{name} r={spec.label}")
            rows.append({"rank": spec.label, "mean_rank": summary["approx_mean_rank"],
                         "mean_energy": summary["approx_mean_energy"],
                         "mean_rel_error": summary["approx_mean_rel_error"],
                         "mean_basis_error": summary["approx_mean_basis_error"], "wikitext2_ppl": ppl,
                         "windows": windows.shape[0], "weights": quant.weight_method, "seconds": round(time.perf_counter() - start, 1)})
            mlflow.log_metric("rank_sweep_ppl", ppl, step=int(round(summary["approx_mean_rank"])))
        write_csv(paths.rank_sweep(cfg, name), rows)
        mlflow.log_artifact(str(paths.rank_sweep(cfg, name)))
