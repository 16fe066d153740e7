"""WikiText-2 perplexity: exp(mean NLL over every predicted token of non-overlapping windows)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, desc: str = "ppl") -> dict[str, float]:
    """Perplexity of ``model`` on ``windows`` ``(n, seqlen)``, one window per forward (batch 1).

    Each window predicts its tokens 1..seqlen-1 from the preceding ones, as in the GPTQ/QuaRot protocol.
    Returns ``{"ppl", "nll", "tokens"}``.
    """
    model.eval()
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(windows, desc=desc, unit="win")
    for window in bar:
        ids = window.unsqueeze(0)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += ids.shape[1] - 1
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}
