"""eval: WikiText-2 test perplexity of the fused model."""
from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..artifacts import write_json
from ..checkpoint import load_fused
from ..config import select_variant
from ..data import eval_windows, tokenize, wikitext2_test_text
from ..perplexity import perplexity
from ..tracking import stage_run


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    model, tok = load_fused(paths.fused(cfg, name), cfg.model)
    windows = eval_windows(tokenize(wikitext2_test_text(cfg.data), tok), cfg.eval.seqlen, cfg.eval.max_windows)
    with stage_run(cfg, "eval", name):
        result = perplexity(model, windows, desc=f"wikitext2 {name}")
        metrics = {"wikitext2_ppl": result["ppl"], "wikitext2_windows": windows.shape[0],
                   "wikitext2_seqlen": windows.shape[1], "wikitext2_tokens": result["tokens"]}
        write_json(paths.eval_metrics(cfg, name), {"method": cfg.method.name, "quant": cfg.quant.name, **metrics})
        mlflow.log_metrics(metrics)
