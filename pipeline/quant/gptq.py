"""GPTQ (Frantar et al. 2022) on the fused model, layer by layer, with every online op active.

``gptq`` quantizes one weight given the Hessian ``H = 2/n Σ x xᵀ`` of its inputs: columns in order (or
by descending ``diag(H)``, act-order), each rounded on a fixed symmetric grid (per-output-channel or
per-group scales with MSE clip, computed from the unquantized weight) and its rounding error spread
over the columns not yet quantized through the upper Cholesky factor of ``H⁻¹``, in lazy blocks
(``quant.gptq_block``, 128).

``gptq_model`` runs the calibration windows through the decoder one layer at a time: it caches the
inputs of the current layer, collects each linear's Hessian from the input the linear really sees
(after online Hadamard and activation quant, with R3, KV quant and the residual transitions active),
quantizes the linears group by group (q/k/v, o, gate/up, down: each later group sees the already
quantized earlier ones; in a MoE layer every expert's gate/up, then every expert's down, each Hessian
from the tokens routed to that expert, RTN with a warning for an expert no token reaches; the router
stays 16-bit) and feeds the quantized layer's outputs to the next layer. ``gptq_layer`` is
one such step, so the streamed fuse (``fuse.streamed``) runs it on each layer as it is loaded: peak
memory is then one layer plus the cached windows' activations.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.adapters import DecoderAdapter, get_linear
from ..model.streaming import layer_inputs, run_layer
from .quantizers import QuantSpec
from .codes import dequantize, expand, quantize_codes, rtn, weight_scale

log = logging.getLogger(__name__)


@torch.no_grad()
def gptq(
    w: torch.Tensor, H: torch.Tensor, bits: int, mse_clip: bool = True, group_size: int = 0,
    damp: float = 0.01, block: int = 128, act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ codes of ``w`` (out, in) for input Hessian ``H`` (in, in).

    Returns ``(codes int8 (out, in), scale (out, G))``; ``dequantize(codes, scale)`` is the weight.
    ``damp`` adds ``damp * mean(diag H)`` to the diagonal.
    """
    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64, copy=True)
    k = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale = weight_scale(W, bits, mse_clip, group_size)  # static grid: groups stay contiguous under act-order
    col_scale = expand(scale, k).to(torch.float32)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H, col_scale = W[:, perm], H[perm][:, perm], col_scale[:, perm]
    # in place and one factor at a time: for Llama-3-8B's down_proj each (in, in) float64 copy is 1.6 GB
    torch.diagonal(H).add_(damp * torch.diagonal(H).mean())
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(Hinv, upper=True)
    del Hinv
    Hinv = U.to(torch.float32)
    del U
    codes = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, s = W1[:, i : i + 1], col_scale[:, i1 + i : i1 + i + 1]
            q = quantize_codes(col, s, bits)
            codes[:, i1 + i : i1 + i + 1] = q
            err = (col - q.to(torch.float32) * s) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    return (codes if perm is None else codes[:, torch.argsort(perm)]), scale


@torch.no_grad()
def gptq_layer(layer: nn.Module, adapter: DecoderAdapter, inputs: list[torch.Tensor], kwargs: dict,
               quant: QuantSpec) -> None:
    """GPTQ one prepared decoder layer in place, group by group (q/k/v, o, gate/up, down), each
    group's Hessians taken with the groups before it already quantized."""
    groups = [adapter.ATTN_READERS, (adapter.ATTN_WRITER,), adapter.quantized_mlp_readers(layer),  # routers: 16-bit
              adapter.mlp_writers(layer)]
    for group in groups:
        hessians = collect_hessians(layer, group, inputs, kwargs)
        for name in group:
            qlin = layer.get_submodule(name)
            linear = get_linear(layer, name)
            H = hessians.pop(name).take()
            if H is None:  # an expert no calibration token was routed to: RTN (the same grid, no Hessian)
                log.warning("gptq: %s saw no calibration token (no token was routed to this expert): "
                            "its weights are RTN-quantized", name)
                codes, scale = rtn(linear.weight.detach().to(torch.float32), quant.w_bits, quant.w_mse_clip,
                                   quant.w_group_size)
            else:
                codes, scale = gptq(linear.weight, H, quant.w_bits, quant.w_mse_clip, quant.w_group_size,
                                    quant.gptq_damp, quant.gptq_block, quant.gptq_act_order)
            linear.weight.copy_(dequantize(codes, scale, linear.weight.dtype))
            qlin.weight_scale = scale.to(linear.weight.dtype)


@torch.no_grad()
def gptq_model(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, quant: QuantSpec,
               desc: str = "gptq") -> None:
    """GPTQ every decoder linear of the prepared (fused, online ops attached) ``model`` in place.

    ``windows``: (N, T) calibration token ids. Each ``QuantLinear``'s ``linear.weight`` becomes
    ``dequantize(codes, scale)`` and its ``weight_scale`` buffer the scale (out, G).
    """
    layers = adapter.layers(model)
    inputs, kwargs = layer_inputs(model, layers[0], windows)
    for layer in tqdm(layers, desc=desc, unit="layer"):
        gptq_layer(layer, adapter, inputs, kwargs, quant)
        inputs = run_layer(layer, inputs, kwargs)


def collect_hessians(layer: nn.Module, group: tuple[str, ...], inputs: list[torch.Tensor],
                     kwargs: dict) -> dict[str, "_Hessian"]:
    """The input Hessians of ``group``'s linears over every cached window of ``layer``.

    Each window's forward stops as soon as every linear of the group has seen its input: nothing after
    it can change a Hessian, so the q/k/v pass costs a norm and the o_proj pass stops before the MLP
    (about half the layer compute of running the whole layer per group). A linear the forward never
    reaches (an expert no token is routed to) just leaves its Hessian empty."""
    hessians = {name: _Hessian() for name in group}
    seen: set[str] = set()

    def hook(name: str):
        def add(module: nn.Module, args: tuple) -> None:
            hessians[name].add(module, args)
            seen.add(name)
            if len(seen) == len(group):
                raise _GroupSeen
        return add

    handles = [get_linear(layer, name).register_forward_pre_hook(hook(name)) for name in group]
    try:
        for h in inputs:
            seen.clear()
            try:
                layer(h, **kwargs)
            except _GroupSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


class _GroupSeen(Exception):
    """Raised by the last Hessian hook of a group to stop that window's layer forward early."""


class _Hessian:
    """Running ``2/n Σ x xᵀ`` over the rows of a linear's inputs (a forward pre-hook)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        xtx = x.T @ x
        if self.sum is None:
            self.sum = xtx
        else:
            self.sum += xtx  # in place: for down_proj each (in, in) copy is 0.8 GB
        self.n += x.shape[0]

    def take(self) -> torch.Tensor | None:
        """The Hessian ``2/n Σ x xᵀ``, scaled in place (the accumulator is used up); None when the linear
        saw no input (a MoE expert no token was routed to)."""
        if self.sum is None or self.n == 0:
            return None
        H, self.sum = self.sum.mul_(2.0 / self.n), None
        return H
