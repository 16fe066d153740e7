"""The streamed fuse: read one decoder layer, transform, quantize, write its shard, free it.

``fuse_streamed`` makes the same checkpoint as ``methods.prepare_model`` + ``checkpoint.save_quantized``
(the same bytes: every weight goes through the same float64 steps in the same order), without ever
holding more than one decoder layer: the skeleton (``streaming.empty_model``) keeps the embedding,
final norm and lm_head; layer i is read from the weight source (safetensors, a tensor at a time), its norms
folded, R4 fused, online ops attached, its bases fused (``FusionBases``), its weights quantized (RTN,
or GPTQ on the activations of the calibration windows carried from layer i - 1), its activation
statistics taken, and its shard written; then its tensors are freed.

Peak memory: one layer (plus its GPTQ Hessians), a few D x D float64 bases, and the activations of
the calibration windows (N x T x D). The embedding is held only to embed the windows (then parked on
disk until the last shard) and lm_head only at the end: at Llama-3-8B shapes each is 1 GB in bf16.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..eval.act_stats import ActivationStats
from ..model.adapters import adapter_for
from ..model.load import WEIGHTS_ATTR
from ..infra.artifacts import atomic_dir, scratch_dir
from ..export.checkpoint import CheckpointWriter, checkpoint_config, layer_state, online_ops, rest_state
from ..infra.errors import PipelineError
from ..surgery.bases import FusionBases
from ..quant.gptq import gptq_layer
from ..methods import (MethodSpec, check_fuse_inputs, empty_transitions, fuse_layer, fuse_steps,
                      prepare_layer_base, prepare_output_base, quantize_layer_rtn)
from ..surgery.online import use_online_attention
from ..quant.quantizers import OFF_BITS, QuantSpec
from ..surgery.plan import embedding_steps, head_steps
from ..model.streaming import Parked, SourceLayers, WeightSource, layer_by_layer, layer_inputs, run_layer
from ..surgery.weights import untie_embeddings
from ..surgery.transitions import LowRankTransitions, attach_layer_transitions


@torch.no_grad()
def fuse_streamed(
    folder: str | Path, model: nn.Module, tokenizer: Any, source: WeightSource, method: MethodSpec,
    rotations: Mapping[str, torch.Tensor], quant: QuantSpec, fingerprint: str,
    subspace: Mapping[str, torch.Tensor] | None = None, calib: torch.Tensor | None = None,
    stats_windows: torch.Tensor | None = None, device: torch.device | str = "cpu",
    extra: dict[str, Any] | None = None, on_layer: Callable[[nn.Module, int], None] | None = None,
) -> list[dict]:
    """Fuse ``model`` (a skeleton from ``streaming.empty_model``; its weights in ``source``) for
    ``method`` at ``quant`` and write the checkpoint into ``folder`` atomically, one layer at a time.

    ``calib`` (N, T): GPTQ's calibration windows; ``stats_windows`` (n, T): windows whose linear inputs
    give the activation statistics returned (``act_stats`` rows; empty without windows). ``on_layer(model,
    i)`` is called while layer i is loaded (a probe for tests). Raises PipelineError on bad input.
    """
    device = torch.device(device)
    adapter = adapter_for(model)
    dims = adapter.dims(model)
    dtype = adapter.embedding(model).weight.dtype
    check_fuse_inputs(model, method, rotations, subspace)
    gptq = quant.weight_method == "gptq" and quant.w_bits < OFF_BITS
    if gptq and calib is None:
        raise PipelineError("quant.weight_method=gptq needs calibration windows (run the calibrate stage)")

    loader = SourceLayers(model, source, device)
    untie_embeddings(model, adapter)  # on the skeleton: lm_head gets its own (meta) weight, read at the end
    use_online_attention(model)
    loader.load_embedding()
    bases = FusionBases(rotations, dims.n_layers, subspace, device, dtype, method.chained)
    fuse_steps(embedding_steps(model, adapter), bases.embedding())
    transitions = empty_transitions(bases.transitions)
    if transitions is not None:
        model.rsq_transitions = transitions  # filled and emptied layer by layer; hooks per layer below
    layers = adapter.layers(model)
    carried, kwargs = layer_inputs(model, layers[0], calib) if gptq else ([], {})
    stats, observed, stats_kwargs = ActivationStats(), [], {}
    if stats_windows is not None and len(stats_windows):
        observed, stats_kwargs = layer_inputs(model, layers[0], stats_windows)
    ranks: dict[str, int] = {}
    with atomic_dir(folder) as staging, scratch_dir(staging.parent, ".parked-") as spare:
        parked = Parked(adapter.embedding(model), spare)  # not needed again until the last shard
        writer = CheckpointWriter(staging, dims.n_layers, fingerprint)
        for i, layer in layer_by_layer(model, loader, f"fuse {method.name}"):
            prepare_layer_base(layer, adapter, method, quant)
            layer_buffers = fuse_layer(layer, i, adapter, bases, transitions)
            if isinstance(transitions, LowRankTransitions):
                ranks.update(transitions.ranks())
            handles = attach_layer_transitions(layer, i, adapter, transitions) if transitions is not None else []
            if gptq:
                gptq_layer(layer, adapter, carried, kwargs, quant)
                carried = run_layer(layer, carried, kwargs)
            else:
                quantize_layer_rtn(layer, adapter, quant)
            if observed:
                watch = stats.watch(layer, i, adapter)
                observed = run_layer(layer, observed, stats_kwargs)
                for h in watch:
                    h.remove()
            if on_layer is not None:
                on_layer(model, i)
            writer.write(i + 1, layer_state(model, adapter, i, quant.w_bits))
            for h in handles:
                h.remove()
            for name in layer_buffers:
                delattr(transitions, name)
        loader.load_output()
        prepare_output_base(model, adapter, method)
        fuse_steps(head_steps(model, adapter), bases.head())
        parked.restore()
        writer.write(dims.n_layers + 1, rest_state(model, adapter))
        kind = bases.transitions
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        writer.finish(checkpoint_config(method, quant, online_ops(dims, method, kind, ranks or None), dtype,
                                        fingerprint, extra, getattr(model, WEIGHTS_ATTR, None)))
        if transitions is not None:
            del model.rsq_transitions
    return stats.rows()
