"""eval: WikiText-2 test perplexity and lm-eval zero-shot accuracy of the fused model.

The checkpoint is reloaded with ``pipeline.load_quantized`` (the exported model is what is measured).
``metrics/eval/<variant>.json`` holds ``wikitext2_ppl``, ``zeroshot_avg`` and one key per zero-shot
task (its headline metric: acc_norm where lm-eval's task defines it, else acc), plus ``<task>_acc`` /
``<task>_acc_norm``, the tasks that ran and the tasks skipped (no data).
"""
from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..artifacts import write_json
from ..checkpoint import load_quantized, load_tokenizer
from ..config import select_variant
from ..data import check_seqlen, wikitext2_windows
from ..models import max_positions
from ..perplexity import perplexity
from ..tracking import stage_run
from ..zeroshot import check_request, evaluate_zeroshot


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    tasks = list(cfg.eval.get("tasks") or [])
    if tasks:  # a typo in the task list fails now, not after the perplexity pass
        check_request(tasks, cfg.eval.limit, cfg.eval.batch_size)
    model, tok = load_quantized(paths.fused(cfg, name)), load_tokenizer(paths.fused(cfg, name))
    check_seqlen(cfg.eval.seqlen, max_positions(model), "eval.seqlen")
    windows, digest = wikitext2_windows(cfg.data, tok, cfg.eval.seqlen, cfg.eval.max_windows)
    with stage_run(cfg, "eval", name):
        result = perplexity(model, windows, desc=f"wikitext2 {name}")
        metrics = {"wikitext2_ppl": result["ppl"], "wikitext2_windows": windows.shape[0],
                   "wikitext2_seqlen": windows.shape[1], "wikitext2_tokens": result["tokens"]}
        zeroshot = {}
        if tasks:
            zeroshot = evaluate_zeroshot(model, tok, cfg.data, tasks, cfg.eval.limit,
                                         batch_size=cfg.eval.batch_size, seed=cfg.seed)
        write_json(paths.eval_metrics(cfg, name), {"method": cfg.method.name, "quant": cfg.quant.name,
                                                   "weights": cfg.quant.get("weight_method", "rtn"),
                                                   "wikitext2_text_sha256": digest, **metrics, **zeroshot})
        mlflow.log_metrics({**metrics, **{k: v for k, v in zeroshot.items() if isinstance(v, float)}})
        mlflow.log_artifact(str(paths.eval_metrics(cfg, name)))
