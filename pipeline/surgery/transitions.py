"""Residual-basis transitions at every residual add (per-layer rotations, DESIGN §1).

A decoder layer computes ``h <- h + attn(norm(h))`` then ``h <- h + mlp(norm(h))``. With per-layer
bases the skip path ``h`` is in the block's input basis and the block's output in its output basis, so
the add must be ``h @ T + out``. We write that as ``out + h @ (T - I)`` added to the block's output:
a forward pre-hook on the block's norm stashes ``h`` (the norm's input is exactly the residual stream),
and a forward hook on the block adds ``apply(key, h)``. Keys: ``attn.<i>``, ``ffn.<i>``. Hooks are
PyTorch's public module-hook API; HF's layer code is not touched.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..model.adapters import DecoderAdapter


def attach_layer_transitions(
    layer: nn.Module, i: int, adapter: DecoderAdapter, apply: Callable[[str, torch.Tensor], torch.Tensor]
) -> list[RemovableHandle]:
    """Add ``apply(key, h)`` to decoder layer ``i``'s attention and MLP outputs (keys ``attn.i``, ``ffn.i``)."""
    handles: list[RemovableHandle] = []
    for norm_name, block_name, site in ((adapter.ATTN_NORM, adapter.ATTENTION, "attn"),
                                        (adapter.MLP_NORM, adapter.MLP, "ffn")):
        stash: dict[str, torch.Tensor] = {}

        def keep(module, args, stash=stash):
            stash["h"] = args[0]

        def add(module, args, out, stash=stash, key=f"{site}.{i}"):
            extra = apply(key, stash.pop("h"))
            if isinstance(out, tuple):  # attention returns (output, weights)
                return (out[0] + extra.to(out[0].dtype), *out[1:])
            return out + extra.to(out.dtype)

        handles.append(layer.get_submodule(norm_name).register_forward_pre_hook(keep))
        handles.append(layer.get_submodule(block_name).register_forward_hook(add))
    return handles


def attach_transitions(
    model: nn.Module, adapter: DecoderAdapter, apply: Callable[[str, torch.Tensor], torch.Tensor]
) -> list[RemovableHandle]:
    """Add ``apply(key, h)`` (``h``: (..., D) residual into the block) to every attention/MLP output."""
    handles: list[RemovableHandle] = []
    for i, layer in enumerate(adapter.layers(model)):
        handles += attach_layer_transitions(layer, i, adapter, apply)
    return handles


class DenseTransitions(nn.Module):
    """The exact transitions of a fused per-layer model: ``T - I`` (D, D) per residual add, as buffers.

    Online cost: one dense D x D matmul per token per add (the expensive exact layer-wise baseline).
    """

    def __init__(self, deltas: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, delta in deltas.items():
            self.register_buffer(key.replace(".", "_"), delta.detach().clone(memory_format=torch.contiguous_format))

    def forward(self, key: str, h: torch.Tensor) -> torch.Tensor:
        """``h @ (T - I)`` for the add named ``key``; ``h``: (..., D)."""
        delta = getattr(self, key.replace(".", "_"))
        return h @ delta.to(h.dtype)

    def keys(self) -> list[str]:
        """The adds it holds, in buffer form (``attn_0``)."""
        return [k for k, _ in self.named_buffers()]


class LowRankTransitions(nn.Module):
    """ReSpinQuant's approximate transitions: per add, ``Q`` (D, r) and ``M`` (r, r) as buffers.

    ``h @ (T̂ - I) = ((h @ Q) @ M) @ Q.T``: 2·D·r + r² MACs per token, no D x D matmul. Computed in
    float32 (or the model's dtype if wider); ranks may differ per add (adaptive mode), r = 0 is exact I.
    """

    def __init__(self, Q: dict[str, torch.Tensor], M: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if set(Q) != set(M):
            raise ValueError("Q and M must name the same transitions")
        for key in Q:
            # row-major copies: a loaded checkpoint's buffers are row-major, and matmul results
            # depend on the layout, so only this keeps loaded logits bit-equal to in-memory ones
            self.register_buffer("Q_" + key.replace(".", "_"), Q[key].detach().clone(memory_format=torch.contiguous_format))
            self.register_buffer("M_" + key.replace(".", "_"), M[key].detach().clone(memory_format=torch.contiguous_format))

    def forward(self, key: str, h: torch.Tensor) -> torch.Tensor:
        """``((h @ Q) @ M) @ Q.T`` for the add named ``key``; ``h``: (..., D) -> (..., D)."""
        name = key.replace(".", "_")
        Q, M = getattr(self, "Q_" + name), getattr(self, "M_" + name)
        dtype = torch.promote_types(h.dtype, torch.float32)
        Q = Q.to(dtype)
        return (((h.to(dtype) @ Q) @ M.to(dtype)) @ Q.T).to(h.dtype)

    def keys(self) -> list[str]:
        """The adds it holds, in buffer form (``attn_0``)."""
        return [k[2:] for k, _ in self.named_buffers() if k.startswith("Q_")]

    def ranks(self) -> dict[str, int]:
        return {k[2:]: v.shape[1] for k, v in self.named_buffers() if k.startswith("Q_")}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "LowRankTransitions":
        """Rebuild from this module's own state dict (``Q_attn_0``, ``M_attn_0``, ...; shapes from it)."""
        Q = {k[2:]: v for k, v in state.items() if k.startswith("Q_")}
        M = {k[2:]: v for k, v in state.items() if k.startswith("M_")}
        return cls(Q, M)  # keys stay in buffer form (attn_0); forward maps attn.0 -> attn_0 the same


def attach_transition_module(model: nn.Module, adapter: DecoderAdapter, transitions: nn.Module) -> None:
    """Own ``transitions`` (Dense or LowRank) as ``model.rsq_transitions`` (saved with the weights)
    and hook it into every residual add."""
    model.rsq_transitions = transitions
    attach_transitions(model, adapter, transitions)
