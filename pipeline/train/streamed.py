"""Streamed rotation training: a model larger than memory trains its rotations one decoder layer at a time.

``stream_for_training`` turns a skeleton (``streaming.empty_model``) into a trainable model that holds
only its embedding, final norm and lm_head:

1. Setup, once: each decoder layer is read from the weight source, prepared exactly as the whole-model
   path prepares it (``methods.prepare_layer_base``: norms folded, R4 fused, online ops attached), given
   its rotation parametrizations (``trainable.parametrize_steps``), written to a spill folder
   (safetensors, compute dtype, one file per layer) and dropped.
2. Training: each layer's forward is checkpointed (``LoadedPerCall``, torch's non-reentrant
   checkpoint), so it runs twice per window, in the forward and again when backward recomputes it;
   each run reads the layer's prepared tensors back from the spill folder and drops them after
   (``streaming.drop``: fresh meta tensors, so whatever autograd saved of the recomputed layer lives
   until that layer's backward, then is freed). HF's own checkpointing is not used: it checkpoints
   ``forward`` inside module hooks, so a hook could not reload the layer for the recompute.

The decoder layers' weights and parametrizations are those of ``prepare_base`` +
``parametrize_rotations``; the embedding and lm_head keep their weights and rotate their activations
instead (``rotate_head_activations``: the same function, without a ``vocab x D`` rotated copy, its
gradient and two ``vocab x D x D`` products per pass), so losses and rotations equal the whole-model
path's up to rounding (tested). Peak memory: embedding and lm_head, one layer's tensors with their
rotated copies, the logits, and the checkpointed layer inputs (``L x T x D`` per window). The spill
folder holds one prepared copy of the decoder layers (16 GB for Llama-3-8B in bf16) and is removed
with the context.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..model.adapters import DecoderAdapter, adapter_for
from ..infra.artifacts import save_tensors, scratch_dir
from ..methods import MethodSpec, prepare_layer_base, prepare_output_base
from ..surgery.online import use_online_attention
from ..quant.quantizers import QuantSpec
from ..surgery.plan import basis, embedding_steps, head_steps, is_per_layer, layer_steps, transform_tensor
from ..model.streaming import INDEX, SafetensorsSource, SourceLayers, WeightSource, drop, materialize
from ..surgery.weights import reader, untie_embeddings
from .trainable import TrainableRotations, parametrize_steps, rotation_transitions
from ..surgery.transitions import attach_transitions


def spill_layers(model: nn.Module, adapter: DecoderAdapter, loader: SourceLayers, method: MethodSpec,
                 quant: QuantSpec, rotations: TrainableRotations, weight_quant: QuantSpec | None,
                 folder: Path) -> SafetensorsSource:
    """Read, prepare and parametrize each decoder layer, write its tensors to ``folder`` (one
    ``layer-<i>.safetensors`` each, an index naming them) and drop it; the spilled layers as a source."""
    weight_map: dict[str, str] = {}
    for i, layer in enumerate(tqdm(adapter.layers(model), desc="prepare layers", unit="layer")):
        loader.load_layer(i)
        prepare_layer_base(layer, adapter, method, quant)
        parametrize_steps(layer_steps(layer, i, adapter), rotations, weight_quant, unsafe=True)
        prefix, file = adapter.layer_prefix(i), f"layer-{i:05d}.safetensors"
        tensors = {prefix + k: v for k, v in layer.state_dict().items()}
        save_tensors(folder / file, tensors, {"fingerprint": "spill"})
        weight_map.update(dict.fromkeys(tensors, file))
        drop(layer)
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return SafetensorsSource(folder)


class LoadedPerCall:
    """Decoder layer i's ``forward`` replaced (as an instance attribute) by one that reads its
    tensors from ``source``, runs the layer's own forward and drops them again; under autograd this
    runs inside a non-reentrant ``torch.utils.checkpoint``, so backward's recompute reads the layer
    once more and nothing of it is kept between the forward and the backward but its input."""

    def __init__(self, layer: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layer, self.prefix, self.source, self.dtype, self.device = layer, prefix, source, dtype, device
        self.forward = layer.forward  # the class's (HF's) forward, bound
        layer.forward = self

    def run(self, *args, **kwargs):
        materialize(self.layer, self.prefix, self.source, self.dtype, self.device)
        try:
            return self.forward(*args, **kwargs)
        finally:
            drop(self.layer)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(self.run, *args, use_reentrant=False, **kwargs)
        return self.run(*args, **kwargs)

    def remove(self) -> None:
        del self.layer.forward


def rotate_head_activations(model: nn.Module, adapter: DecoderAdapter,
                            rotations: TrainableRotations) -> list[RemovableHandle]:
    """Rotate the embedding's output and lm_head's input instead of their weights: the looked-up rows
    ``E[ids] @ A_0`` (the embedding step's transforms act on each row alone) and ``h @ A_L.T`` before
    lm_head (``h (W A_L)^T = (h A_L^T) W^T``). The same function as the parametrized weights, at
    ``T x D x D`` per window instead of two ``vocab x D x D`` products and their gradients."""
    (emb, _, emb_transforms), = embedding_steps(model, adapter)
    (head, _, head_transforms), = head_steps(model, adapter)
    if not all(fn is reader for fn, _ in emb_transforms + head_transforms):
        raise ValueError("embedding and lm_head are expected to read the stream (surgery.reader)")

    def rotate_rows(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        return transform_tensor(out, emb_transforms, rotations.as_dict())

    def unrotate_input(module: nn.Module, args) -> tuple:
        h = args[0]
        for _, key in reversed(head_transforms):
            R = basis(rotations.as_dict(), key)
            if R is not None:
                h = h @ R.to(device=h.device, dtype=h.dtype).T
        return (h, *args[1:])

    return [emb.register_forward_hook(rotate_rows), head.register_forward_pre_hook(unrotate_input)]


@contextlib.contextmanager
def stream_for_training(model: nn.Module, source: WeightSource, method: MethodSpec, quant: QuantSpec,
                        rotations: TrainableRotations, device: torch.device | str,
                        spill_dir: str | Path | None = None) -> Iterator[nn.Module]:
    """Make skeleton ``model`` (weights in ``source``) train ``rotations`` layer by layer; yields it.

    ``quant``: the training quantizers (activations/KV; weights too unless ``w_bits`` is 16).
    ``rotations`` must already be on ``device``. The spill folder is made under ``spill_dir`` (default:
    the system's temp dir) and removed on exit, also on error.
    """
    device = torch.device(device)
    adapter = adapter_for(model)
    loader = SourceLayers(model, source, device)
    untie_embeddings(model, adapter)  # on the skeleton: lm_head gets its own (meta) weight, read next
    use_online_attention(model)
    loader.load_head()
    prepare_output_base(model, adapter, method)
    for p in model.parameters():
        p.requires_grad_(False)
    with scratch_dir(spill_dir or tempfile.gettempdir(), ".spill-") as folder:
        spilled = spill_layers(model, adapter, loader, method, quant, rotations, quant, folder)
        dtype = adapter.embedding(model).weight.dtype
        handles: list = [LoadedPerCall(layer, adapter.layer_prefix(i), spilled, dtype, device)
                         for i, layer in enumerate(adapter.layers(model))]
        handles += rotate_head_activations(model, adapter, rotations)
        if is_per_layer(rotations.as_dict()):
            handles += attach_transitions(model, adapter, rotation_transitions(rotations))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
