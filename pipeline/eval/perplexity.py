"""WikiText-2 perplexity: exp(mean NLL over every predicted token of non-overlapping windows).

Two ways to the same number: ``perplexity`` runs the whole model on each window; ``perplexity_streamed``
runs the windows layer-sequentially (the GPTQ-style evaluation of a model that does not fit: every
window's hidden states pass layer i, then layer i is freed and layer i + 1 loaded). Each layer sees
the same inputs and keyword arguments either way, so the two give the same NLL.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..infra.errors import PipelineError
from ..model.adapters import adapter_for
from ..model.streaming import layer_by_layer, layer_inputs, run_layer


def _ppl(mean_nll: float) -> float:
    """``exp(mean_nll)``; a NaN/inf NLL, or one whose exp overflows float64 (past ~709.78), is a
    PipelineError: such a model's logits are broken, and no perplexity is recorded for it."""
    if not math.isfinite(mean_nll):
        raise PipelineError(f"the mean NLL is {mean_nll}: the model computes non-finite logits (NaN/inf "
                            "weights or activations); no perplexity is recorded")
    if mean_nll >= 709.0:
        raise PipelineError(f"the mean NLL is {mean_nll:.1f} nats: its perplexity overflows float64; "
                            "no perplexity is recorded")
    return math.exp(mean_nll)


def _device(model: nn.Module) -> torch.device:
    return next(model.get_input_embeddings().parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, desc: str = "ppl") -> dict[str, float]:
    """Perplexity of ``model`` on ``windows`` ``(n, seqlen)``, one window per forward (batch 1).

    Each window predicts its tokens 1..seqlen-1 from the preceding ones, as in the GPTQ/QuaRot protocol.
    Returns ``{"ppl", "nll", "tokens", "window_nll"}``: ``window_nll`` is each window's mean NLL (nats
    per predicted token), what the report pairs between variants.
    """
    model.eval()
    device = _device(model)
    window_nll: list[float] = []
    bar = tqdm(windows, desc=desc, unit="win")
    for window in bar:
        ids = window.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        window_nll.append(F.cross_entropy(logits, ids[0, 1:]).item())
        bar.set_postfix(ppl=f"{_ppl(sum(window_nll) / len(window_nll)):.3f}")
    return _result(window_nll, windows.shape[1] - 1)


def _result(window_nll: list[float], tokens_per_window: int) -> dict:
    """The perplexity result of equal-length windows from their mean NLLs."""
    mean = sum(window_nll) / len(window_nll)
    return {"ppl": _ppl(mean), "nll": mean, "tokens": tokens_per_window * len(window_nll), "window_nll": window_nll}


@torch.no_grad()
def perplexity_streamed(model: nn.Module, reader, windows: torch.Tensor, desc: str = "ppl") -> dict[str, float]:
    """``perplexity`` of a checkpoint opened with ``checkpoint.open_quantized`` (``model`` holds only its
    embedding, final norm and lm_head; ``reader`` loads and frees each decoder layer), layer-sequentially.

    Memory: one decoder layer plus the hidden states of every window, ``(n, seqlen, D)``.
    """
    model.eval()
    adapter = adapter_for(model)
    hidden, kwargs = layer_inputs(model, adapter.layers(model)[0], windows)
    for _, layer in layer_by_layer(model, reader, f"{desc} (layer-sequential)"):
        hidden = run_layer(layer, hidden, kwargs)
    norm = model.get_submodule(adapter.FINAL_NORM)
    head = adapter.lm_head(model)
    device = _device(model)
    window_nll = []
    for h, window in zip(hidden, windows):
        ids = window.unsqueeze(0).to(device)
        logits = head(norm(h))[0, :-1].float()
        window_nll.append(F.cross_entropy(logits, ids[0, 1:]).item())
    return _result(window_nll, windows.shape[1] - 1)
