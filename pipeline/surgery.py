"""Function-preserving weight surgery: norm folding and the R1/R2/R4 rotations (DESIGN §1).

Conventions: ``nn.Linear`` computes ``y = x @ W.T`` with ``W`` of shape ``(out, in)``; activations are
row vectors; rotating the residual stream means ``h -> h @ R`` with ``R`` orthogonal ``(D, D)``.
Every function here is exact in float64: products are taken in float64 and cast back to the weight's
dtype, so a float64 model stays float64-exact.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import DecoderAdapter, get_linear
from .hadamard import online_hadamard
from .norms import RMSNorm


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


@torch.no_grad()
def rotate_reader(linear: nn.Linear, R: torch.Tensor) -> None:
    """A linear that READS the rotated stream: ``W <- W @ R`` (``W``: (out, D), ``R``: (D, D))."""
    linear.weight.copy_((_f64(linear.weight) @ _f64(R)).to(linear.weight.dtype))


@torch.no_grad()
def rotate_writer(linear: nn.Linear, R: torch.Tensor) -> None:
    """A linear that WRITES the rotated stream: ``W <- R.T @ W``, ``b <- b @ R`` (``W``: (D, in))."""
    linear.weight.copy_((_f64(R).T @ _f64(linear.weight)).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((_f64(linear.bias) @ _f64(R)).to(linear.bias.dtype))


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, R: torch.Tensor) -> None:
    """The embedding writes the stream: ``E <- E @ R`` (``E``: (vocab, D))."""
    embedding.weight.copy_((_f64(embedding.weight) @ _f64(R)).to(embedding.weight.dtype))


@torch.no_grad()
def untie_embeddings(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Give lm_head its own copy of a tied embedding table, so the two can be rotated apart."""
    head, emb = adapter.lm_head(model), adapter.embedding(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    # transformers re-ties on load/save when this is set; the model is untied for good now
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


@torch.no_grad()
def fold_norms(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Fold every RMSNorm scale into the linears reading it (``W <- W * gamma`` column-wise).

    Each norm is replaced by an ``RMSNorm`` with unit weight, which commutes with any rotation.
    """
    for parent, attr, readers in adapter.norm_sites(model):
        norm = getattr(parent, attr)
        gamma = _f64(norm.weight)
        for linear in readers:
            linear.weight.copy_((_f64(linear.weight) * gamma).to(linear.weight.dtype))
        folded = RMSNorm.from_hf(norm)
        folded.weight.fill_(1.0)
        setattr(parent, attr, folded)


def replace_norms(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Swap HF norms for dtype-faithful ``RMSNorm`` with the same weights (no folding)."""
    for parent, attr, _ in adapter.norm_sites(model):
        setattr(parent, attr, RMSNorm.from_hf(getattr(parent, attr)))


def apply_r1(model: nn.Module, adapter: DecoderAdapter, R1: torch.Tensor) -> None:
    """Rotate the residual stream of a norm-folded, untied model by one ``(D, D)`` R1."""
    rotate_embedding(adapter.embedding(model), R1)
    for layer in adapter.layers(model):
        for name in (*adapter.ATTN_READERS, *adapter.MLP_READERS):
            rotate_reader(get_linear(layer, name), R1)
        for name in (adapter.ATTN_WRITER, adapter.MLP_WRITER):
            rotate_writer(get_linear(layer, name), R1)
    rotate_reader(adapter.lm_head(model), R1)


@torch.no_grad()
def apply_r2(layer: nn.Module, adapter: DecoderAdapter, R2: torch.Tensor) -> None:
    """Rotate each head's value vector by ``R2`` (head_dim, head_dim): ``v_h <- v_h @ R2``.

    v_proj rows of head h: ``W_h <- R2.T @ W_h`` (bias ``b_h <- b_h @ R2``); o_proj columns of every
    query head: ``Wo_h <- Wo_h @ R2``. With GQA one R2 serves every query head of a KV group.
    """
    v, o = get_linear(layer, adapter.V_PROJ), get_linear(layer, adapter.ATTN_WRITER)
    hd = R2.shape[0]
    R = _f64(R2)
    wv = _f64(v.weight).reshape(-1, hd, v.weight.shape[1])  # (kv_heads, hd, D)
    v.weight.copy_((R.T @ wv).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((_f64(v.bias).reshape(-1, hd) @ R).reshape(-1).to(v.bias.dtype))
    wo = _f64(o.weight).reshape(o.weight.shape[0], -1, hd)  # (D, heads, hd)
    o.weight.copy_((wo @ R).reshape(o.weight.shape).to(o.weight.dtype))


@torch.no_grad()
def fuse_r4(layer: nn.Module, adapter: DecoderAdapter) -> None:
    """down_proj input rotation R4 = H (I, I): ``W_down <- W_down @ H``.

    H is the normalised Hadamard, applied row-wise by the fast transform (``fht(W) == W @ H``, no dense
    (I, I) matrix), or the seeded random orthogonal fallback where I has no Hadamard construction.
    The matching online op ``x <- x @ H`` runs on down_proj's input (see ``online.QuantLinear``), so
    ``(x @ H) @ (W @ H).T == x @ W.T``.
    """
    down = get_linear(layer, adapter.MLP_WRITER)
    down.weight.copy_(online_hadamard(_f64(down.weight)).to(down.weight.dtype))
