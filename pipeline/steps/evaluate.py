"""eval: WikiText-2 test perplexity of the fused model."""
from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from .. import paths
from ..artifacts import write_json
from ..checkpoint import load_quantized, load_tokenizer
from ..config import select_variant
from ..data import check_seqlen, eval_windows, text_digest, tokenize, wikitext2_test_text
from ..models import max_positions
from ..perplexity import perplexity
from ..tracking import stage_run


def run(cfg: DictConfig) -> None:
    name, cfg = select_variant(cfg)
    model, tok = load_quantized(paths.fused(cfg, name)), load_tokenizer(paths.fused(cfg, name))
    check_seqlen(cfg.eval.seqlen, max_positions(model), "eval.seqlen")
    text = wikitext2_test_text(cfg.data)
    windows = eval_windows(tokenize(text, tok), cfg.eval.seqlen, cfg.eval.max_windows)
    with stage_run(cfg, "eval", name):
        result = perplexity(model, windows, desc=f"wikitext2 {name}")
        metrics = {"wikitext2_ppl": result["ppl"], "wikitext2_windows": windows.shape[0],
                   "wikitext2_seqlen": windows.shape[1], "wikitext2_tokens": result["tokens"]}
        write_json(paths.eval_metrics(cfg, name), {"method": cfg.method.name, "quant": cfg.quant.name,
                                                   "weights": cfg.quant.get("weight_method", "rtn"),
                                                   "wikitext2_text_sha256": text_digest(text), **metrics})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(paths.eval_metrics(cfg, name)))
