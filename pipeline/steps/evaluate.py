"""eval: WikiText-2 test perplexity and lm-eval zero-shot accuracy of the fused model.

The checkpoint is reloaded with ``pipeline.load_quantized`` (the exported model is what is measured),
on ``device``. A model that does not fit (``eval.stream``: ``auto`` decides from the checkpoint's size
and the device's free memory) is evaluated layer-sequentially, perplexity only.
``metrics/eval/<variant>.json`` holds ``wikitext2_ppl``, ``zeroshot_avg`` and one key per zero-shot
task (its headline metric: acc_norm where lm-eval's task defines it, else acc), plus ``<task>_acc`` /
``<task>_acc_norm``, the tasks that ran and the tasks skipped (no data). ``eval.corpus`` (a UTF-8 text
file) replaces WikiText-2 with the user's text, windowed the same way; its keys are ``corpus_*``.
``metrics/eval_windows/<variant>.json`` keeps each window's mean NLL (the report's paired statistics).

``eval.backend``: ``fake`` (float fake quantization: any bit setting, the default, what every committed
result used) or ``kernel`` (W4A4 with per-channel weight scales: every quantized linear on the integer
kernels, R3 and the KV quant on the C++ ops; the same perplexity to float rounding, faster on the CPU:
docs/kernels.md). The perplexity pass's wall time goes to MLflow (``eval_seconds``).
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from ..infra import paths
from ..infra.artifacts import write_json
from ..export.checkpoint import check_backend, check_made_for, load_quantized, load_tokenizer, loaded_bytes, open_quantized
from ..infra.config import select_variant
from ..eval.data import check_corpus_file, check_seqlen, eval_corpus_windows
from ..infra.devices import choose_stream, resolve_device
from ..infra.errors import PipelineError
from ..infra.settings import output_setting, quant_label, setting_tag
from ..methods import MethodSpec, quant_spec
from ..model.load import max_positions
from ..eval.perplexity import perplexity, perplexity_streamed
from ..infra.tracking import stage_run
from ..eval.zeroshot import check_request, evaluate_zeroshot


def run(cfg: DictConfig) -> None:
    import mlflow

    name, cfg = select_variant(cfg)
    device = resolve_device(cfg.get("device"))
    tasks = list(cfg.eval.get("tasks") or [])
    if tasks:  # a typo in the task list fails now, not after the perplexity pass
        check_request(tasks, cfg.eval.limit, cfg.eval.batch_size)
    corpus = cfg.eval.get("corpus")
    if corpus:
        check_corpus_file(corpus)  # a bad corpus fails now, before the checkpoint is loaded
    corpus_name = str(corpus) if corpus else "wikitext2"
    backend = str(cfg.eval.get("backend", "fake"))
    check_backend(backend, "eval.backend")  # now: the streamed path never reaches load_quantized's check
    folder = paths.fused(cfg, name)
    stream = choose_stream(cfg.eval.get("stream", "auto"), "eval.stream", lambda: loaded_bytes(folder), device, 0.8)
    if stream and tasks:
        raise PipelineError(f"{folder} is evaluated layer-sequentially (eval.stream), which measures perplexity "
                            "only: zero-shot needs the whole model in memory; set eval.tasks=[] or eval.stream=false")
    if stream and backend == "kernel":
        raise PipelineError(f"{folder} is evaluated layer-sequentially (eval.stream), on the fake-quant ops only: "
                            "eval.backend=kernel needs the whole model in memory (eval.stream=false)")
    # the results are labelled with cfg's model, method and quant: the checkpoint must be theirs
    setting = output_setting(cfg)
    check_made_for(folder, cfg.model, MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant), setting)
    if stream:
        model, reader = open_quantized(folder, device)
    else:
        model, reader = load_quantized(folder, backend=backend, device=device), None
    tok = load_tokenizer(folder)
    check_seqlen(cfg.eval.seqlen, max_positions(model), "eval.seqlen")
    windows, digest, key = eval_corpus_windows(cfg.data, corpus, tok, cfg.eval.seqlen, cfg.eval.max_windows)
    with stage_run(cfg, "eval", name):
        start = time.perf_counter()
        if reader is not None:
            result = perplexity_streamed(model, reader, windows, desc=f"{key} {name}")
        else:
            result = perplexity(model, windows, desc=f"{key} {name}")
        seconds = time.perf_counter() - start
        print(f"eval: {key} perplexity {result['ppl']:.4f} in {seconds:.1f} s (backend {backend})")
        mlflow.log_metric("eval_seconds", seconds)
        metrics = {f"{key}_ppl": result["ppl"], f"{key}_windows": windows.shape[0],
                   f"{key}_seqlen": windows.shape[1], f"{key}_tokens": result["tokens"]}
        zeroshot = {}
        if tasks:
            zeroshot = evaluate_zeroshot(model, tok, cfg.data, tasks, cfg.eval.limit,
                                         batch_size=cfg.eval.batch_size, seed=cfg.seed)
        write_json(paths.eval_metrics(cfg, name), {"method": cfg.method.name, "quant": quant_label(cfg.quant),
                                                   "weights": cfg.quant.get("weight_method", "rtn"),
                                                   "seed": cfg.get("seed", 0), "layer_sequential": stream, "backend": backend,
                                                   "corpus": corpus_name, f"{key}_text_sha256": digest, **metrics, **zeroshot,
                                                   "setting_tag": setting_tag(setting), "config": setting})
        write_json(paths.eval_windows(cfg, name), {"seed": cfg.get("seed", 0),
                                                   "corpus": corpus_name, "text_sha256": digest, "seqlen": windows.shape[1],
                                                   "window_nll": result["window_nll"]})
        mlflow.log_metrics({**metrics, **{k: v for k, v in zeroshot.items() if isinstance(v, float)}})
        mlflow.log_artifact(str(paths.eval_metrics(cfg, name)))
