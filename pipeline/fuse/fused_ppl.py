"""WikiText-2 perplexity of a model fused for a method, without keeping a checkpoint (rank_sweep, sweep).

Whole-model (``stream=False``): the model is loaded, fused in memory (``methods.prepare_model``) and
evaluated. Streamed (``stream=True``, for a model that does not fit): ``fuse.streamed.fuse_streamed``
writes a temporary checkpoint one decoder layer at a time, ``perplexity_streamed`` evaluates it layer
by layer, and the checkpoint is removed. Both give the same perplexity (the streamed fuse writes the
whole-model bytes; layer-sequential perplexity equals the whole forward; tested).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..infra.artifacts import scratch_dir
from ..export.checkpoint import open_quantized
from ..infra.devices import choose_stream
from ..methods import MethodSpec, prepare_model
from ..model.load import cache_dir, load_model, model_fingerprint
from ..eval.perplexity import perplexity, perplexity_streamed
from ..quant.quantizers import QuantSpec
from .streamed import fuse_streamed
from ..model.streaming import open_model

STREAM_SHARE = 0.5  # stream=auto streams a model whose weights exceed this share of free memory


def should_stream(setting, what: str, model_cfg, device: torch.device, dtype: torch.dtype) -> bool:
    """``setting`` (true / false / auto) for the configured model: auto streams when its weights in
    ``dtype`` exceed half the free memory of ``device``. Reads only the model's tensor headers."""
    return choose_stream(setting, what, lambda: open_model(model_cfg, dtype)[2].nbytes(dtype), device, STREAM_SHARE)


def fused_perplexity(model_cfg, method: MethodSpec, rotations: Mapping[str, torch.Tensor], quant: QuantSpec,
                     subspace: Mapping[str, torch.Tensor] | None, calib: torch.Tensor | None, windows: torch.Tensor,
                     device: torch.device, dtype: torch.dtype, stream: bool, desc: str) -> float:
    """Perplexity of the configured model fused for ``method`` at ``quant`` on ``windows`` (n, T).

    ``calib`` (N, T): GPTQ's windows (None for RTN). A streamed run's temporary checkpoint lives under
    ``$RSQ_CACHE_DIR/fused-tmp`` (one at a time) and is removed, also on error.
    """
    if not stream:
        model, _ = load_model(model_cfg, device)
        prepare_model(model, method, dict(rotations), quant, dict(subspace) if subspace is not None else None, calib)
        return perplexity(model, windows, desc=desc)["ppl"]
    skeleton, tok, source = open_model(model_cfg, dtype)
    with scratch_dir(cache_dir(model_cfg) / "fused-tmp", ".fused-") as tmp:
        folder = tmp / "fused"
        fuse_streamed(folder, skeleton, tok, source, method, rotations, quant, model_fingerprint(skeleton),
                      subspace, calib, None, device)
        model, reader = open_quantized(folder, device)
        return perplexity_streamed(model, reader, windows, desc=desc)["ppl"]
