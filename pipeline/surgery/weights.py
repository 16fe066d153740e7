"""Function-preserving weight surgery: the rotation transforms, norm folding, untying, R4 (DESIGN §1).

Conventions: ``nn.Linear`` computes ``y = x @ W.T`` with ``W`` of shape ``(out, in)``; activations are
row vectors; rotating the residual stream means ``h -> h @ R`` with ``R`` orthogonal ``(D, D)``.
In-place functions here are exact in float64: products are taken in float64 and cast back to the
weight's dtype, so a float64 model stays float64-exact.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.adapters import DecoderAdapter, get_linear
from ..rotation.hadamard import online_hadamard
from .norms import RMSNorm


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


F64_CHUNK_ELEMENTS = 1 << 23  # float64 elements per row chunk of a large tensor (64 MiB)
_ROW_ALIGN = 1024  # chunks start at multiples of 1024 rows: the whole product's bits on MKL/oneDNN here


@torch.no_grad()
def in_float64(t: torch.Tensor, fn, chunk_elements: int | None = F64_CHUNK_ELEMENTS) -> None:
    """``t <- fn(t in float64)`` cast back to ``t``'s dtype, in place.

    With ``chunk_elements`` (``fn`` must then act on each row alone), a 2-D ``t`` larger than that goes
    through in chunks of whole rows, so peak memory is two chunks, not two float64 copies of ``t``
    (Llama-3-8B's lm_head is 4.2 GB in float64). ``None``: the whole tensor at once.
    """
    if chunk_elements is None or t.dim() != 2 or t.numel() <= chunk_elements:
        t.copy_(fn(_f64(t)).to(t.dtype))
        return
    rows = max(_ROW_ALIGN, chunk_elements // t.shape[1] // _ROW_ALIGN * _ROW_ALIGN)
    for start in range(0, t.shape[0], rows):
        part = t[start:start + rows]
        part.copy_(fn(_f64(part)).to(t.dtype))


# --- pure transforms on tensors: applied in float64 by methods.apply_rotation_set (fuse) and on the
# fly with autograd by trainable.py (training), both through rotation_plan

def reader(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A linear that READS the rotated stream (or an embedding that writes it): ``W @ R``.

    ``W``: (out, D) weight or (vocab, D) embedding, ``R``: (D, D).
    """
    return W @ R


def writer(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A linear that WRITES the rotated stream: ``R.T @ W`` (``W``: (D, in)); its bias: ``b @ R``."""
    return R.T @ W


def bias_writer(b: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The bias of a stream writer: ``b @ R`` (``b``: (D,))."""
    return b @ R


def head_rows(W: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """v_proj rows per head: ``W_h <- R2.T @ W_h`` (``W``: (kv_heads*hd, D)), so ``v_h <- v_h @ R2``."""
    hd = R2.shape[0]
    return (R2.T @ W.reshape(-1, hd, W.shape[1])).reshape(W.shape)


def head_bias(b: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """v_proj bias per head: ``b_h <- b_h @ R2``."""
    return (b.reshape(-1, R2.shape[0]) @ R2).reshape(-1)


def head_cols(W: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """o_proj columns of every query head: ``W_h <- W_h @ R2`` (``W``: (D, heads*hd)); GQA-safe."""
    return (W.reshape(W.shape[0], -1, R2.shape[0]) @ R2).reshape(W.shape)


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


def _fold_site(parent: nn.Module, attr: str, readers: list[nn.Linear]) -> None:
    norm = getattr(parent, attr)
    gamma = _f64(norm.weight)
    for linear in readers:
        in_float64(linear.weight, lambda w: w * gamma)  # column scaling: rows apart
    folded = RMSNorm.from_hf(norm)
    folded.weight.fill_(1.0)
    setattr(parent, attr, folded)


@torch.no_grad()
def fold_layer_norms(layer: nn.Module, adapter: DecoderAdapter) -> None:
    """Fold a decoder layer's two RMSNorm scales into the linears reading them (see ``fold_norms``)."""
    for site in adapter.layer_norm_sites(layer):
        _fold_site(*site)


@torch.no_grad()
def fold_final_norm(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Fold the final RMSNorm scale into lm_head (see ``fold_norms``)."""
    _fold_site(*adapter.final_norm_site(model))


@torch.no_grad()
def fold_norms(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Fold every RMSNorm scale into the linears reading it (``W <- W * gamma`` column-wise).

    Each norm is replaced by an ``RMSNorm`` with unit weight, which commutes with any rotation.
    """
    for layer in adapter.layers(model):
        fold_layer_norms(layer, adapter)
    fold_final_norm(model, adapter)


def replace_layer_norms(layer: nn.Module, adapter: DecoderAdapter) -> None:
    """Swap a decoder layer's HF norms for dtype-faithful ``RMSNorm`` (see ``replace_norms``)."""
    for parent, attr, _ in adapter.layer_norm_sites(layer):
        setattr(parent, attr, RMSNorm.from_hf(getattr(parent, attr)))


def replace_final_norm(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Swap the final HF norm for a dtype-faithful ``RMSNorm`` (see ``replace_norms``)."""
    parent, attr, _ = adapter.final_norm_site(model)
    setattr(parent, attr, RMSNorm.from_hf(getattr(parent, attr)))


def replace_norms(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Swap HF norms for dtype-faithful ``RMSNorm`` with the same weights (no folding)."""
    for parent, attr, _ in adapter.norm_sites(model):
        setattr(parent, attr, RMSNorm.from_hf(getattr(parent, attr)))


@torch.no_grad()
def fuse_r4(layer: nn.Module, adapter: DecoderAdapter) -> None:
    """down_proj input rotation R4 = H (I, I): ``W_down <- W_down @ H``.

    H is the normalised Hadamard, applied row-wise by the fast transform (``fht(W) == W @ H``, no dense
    (I, I) matrix), or the seeded random orthogonal fallback where I has no Hadamard construction.
    The matching online op ``x <- x @ H`` runs on down_proj's input (see ``online.QuantLinear``), so
    ``(x @ H) @ (W @ H).T == x @ W.T``. A MoE layer: every expert's down_proj.
    """
    for name in adapter.mlp_writers(layer):
        down = get_linear(layer, name)
        down.weight.copy_(online_hadamard(_f64(down.weight)).to(down.weight.dtype))
