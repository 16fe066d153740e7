"""The float64 bases a rotation set gives each part of the model, handed out in stream order.

A fuse goes embedding -> layer 0 -> ... -> layer L-1 -> lm_head, and each part needs only its own
bases: the embedding ``A.0``; layer i ``A.i``, ``B.i``, ``A.<i+1>`` and ``R2.i`` plus the transitions of
its two residual adds; lm_head ``A.L``. ``FusionBases`` reads each matrix from the rotation set when a
part first needs it (a lazy set reads it from disk then), re-orthonormalises it in float64 on the
fuse device and keeps only what the next part still needs, so a fuse holds a few D x D matrices, not
the 2L + 1 of a per-layer set (65 x 128 MiB in float64 for Llama-3-8B).

Per-layer sets with a ``subspace`` (ReSpinQuant) get the rank-r transitions ``T̂ = I + Q M Qᵀ`` at the
residual adds. The paper's variant fuses the trained bases as they are (``T̂`` stands in for the
trained ``T``, a function error at r < D). The chained variant (``chained=True``) fuses the bases chained
from the approximations (``subspace.chained_bases``): ``Â_0 = A_0``, ``B̂_i = Â_i T̂_attn_i``,
``Â_{i+1} = B̂_i T̂_ffn_i``; every product is the one ``chained_bases`` takes, in the same order, so the
streamed and the whole-model fuse give the same bits.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..rotation.cayley import orthonormalize
from ..rotation.subspace import restore_float64


class FusionBases:
    """Bases of ``rotations`` (``R1``/``R2.i`` or ``A.i``/``B.i``/``R2.i``) for one fuse, part by part.

    ``transitions`` says what the residual adds get: ``none`` (global set), ``dense`` (``T - I`` in the
    model's ``dtype``) or ``low_rank`` (``Q``, ``M`` in at least float32, from ``subspace``; the weights
    in the trained bases, or with ``chained`` in the bases chained from ``Q``, ``M``).
    """

    def __init__(self, rotations: Mapping[str, torch.Tensor], n_layers: int,
                 subspace: Mapping[str, torch.Tensor] | None, device: torch.device, dtype: torch.dtype,
                 chained: bool = False) -> None:
        self.rotations, self.subspace, self.n_layers = rotations, subspace, n_layers
        self.device, self.dtype, self.chained = device, dtype, chained
        self.per_layer = any(k.startswith("A.") for k in rotations.keys())
        self.transitions = "low_rank" if subspace is not None else ("dense" if self.per_layer else "none")
        self._held: dict[str, torch.Tensor] = {}

    def _basis(self, key: str) -> torch.Tensor | None:
        """``key`` orthonormalised in float64 on the device (None: not in the set, an identity)."""
        if key in self._held:
            return self._held[key]
        if key not in self.rotations.keys():
            return None
        return orthonormalize(self.rotations[key].detach().to(self.device, torch.float64))

    def _keep(self, bases: dict[str, torch.Tensor | None], *keys: str) -> dict[str, torch.Tensor]:
        """Hold ``keys`` for the next part (and drop the rest); the non-None ``bases``."""
        self._held = {k: bases[k] for k in keys if bases.get(k) is not None}
        if "R1" in bases and bases["R1"] is not None:
            self._held["R1"] = bases["R1"]
        return {k: v for k, v in bases.items() if v is not None}

    def embedding(self) -> dict[str, torch.Tensor]:
        """Bases the embedding table needs (``A.0``, or ``R1`` of a global set)."""
        return self._keep({"R1": self._basis("R1"), "A.0": self._basis("A.0")}, "A.0")

    def layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Bases of decoder layer ``i``, and its transitions as ``{buffer name: tensor}`` (``attn_<i>``,
        ``ffn_<i>`` dense; ``Q_attn_<i>``, ``M_attn_<i>``, ... low-rank; empty for a global set)."""
        a_in, b, a_out = f"A.{i}", f"B.{i}", f"A.{i + 1}"
        bases = {"R1": self._basis("R1"), f"R2.{i}": self._basis(f"R2.{i}")}
        transitions: dict[str, torch.Tensor] = {}
        if self.transitions == "low_rank":
            bases[a_in] = self._basis(a_in)  # chained: the chained basis, held from the previous part
            if not self.chained:
                bases.update({k: self._basis(k) for k in (b, a_out)})
            current = bases[a_in]
            for site, after in (("attn", b), ("ffn", a_out)):
                key = f"{site}.{i}"
                Q, M = restore_float64(self.subspace[f"Q.{key}"].to(self.device), self.subspace[f"M.{key}"].to(self.device))
                if self.chained:
                    current = current + ((current @ Q) @ M) @ Q.T
                    bases[after] = current
                t_dtype = torch.promote_types(self.dtype, torch.float32)
                transitions[f"Q_{site}_{i}"] = _buffer(Q.to(t_dtype))
                transitions[f"M_{site}_{i}"] = _buffer(M.to(t_dtype))
        elif self.transitions == "dense":
            bases.update({k: self._basis(k) for k in (a_in, b, a_out)})
            eye = torch.eye(bases[a_in].shape[0], dtype=torch.float64, device=self.device)
            transitions[f"attn_{i}"] = _buffer((bases[a_in].T @ bases[b] - eye).to(self.dtype))
            transitions[f"ffn_{i}"] = _buffer((bases[b].T @ bases[a_out] - eye).to(self.dtype))
        return self._keep(bases, a_out), transitions

    def head(self) -> dict[str, torch.Tensor]:
        """Bases lm_head needs (``A.L``, or ``R1``)."""
        key = f"A.{self.n_layers}"
        return self._keep({"R1": self._basis("R1"), key: self._basis(key)})


def _buffer(t: torch.Tensor) -> torch.Tensor:
    # row-major copies: a loaded checkpoint's buffers are row-major, and matmul results depend on the
    # layout, so only this keeps loaded logits bit-equal to in-memory ones
    return t.detach().clone(memory_format=torch.contiguous_format)
