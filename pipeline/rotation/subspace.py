"""Residual subspace approximation of the per-layer transitions (ReSpinQuant, DESIGN §1).

For a transition ``T`` (D, D, orthogonal) of a per-layer rotation set, in float64:
``ΔT = T - I = U S Vᵀ``; ``Q = U[:, :r]`` (D, r); ``R̂ = polar(Qᵀ T Q)`` (r, r); ``M = R̂ - I``. The
approximation ``T̂ = I + Q M Qᵀ`` is orthogonal (``Q`` has orthonormal columns and ``R̂`` is
orthogonal), equals ``T`` at ``r = D`` and ``I`` at ``r = 0``. Online it costs ``2·D·r + r²`` MACs per
token: ``h @ T̂ = h + ((h @ Q) @ M) @ Qᵀ``.

Two variants (DESIGN §1), chosen by ``chained``:
- the paper's ReSpinQuant (``chained=False``): each ``T̂`` approximates the trained transition
  (``A_iᵀ B_i``, ``B_iᵀ A_{i+1}``) and the trained bases are fused as they are, so the model's function
  changes by ``T̂ − T`` at every add; ``r = D`` is exact layer-wise, ``r = 0`` an uncorrected basis
  mismatch.
- chained (this project's addition, ``chained=True``): the bases the weights are fused with are
  chained from the approximations, so the quantization-off model stays exactly the original function
  at every rank: ``Â_0 = A_0``, then along the stream ``B̂_i = Â_i T̂_attn_i`` and
  ``Â_{i+1} = B̂_i T̂_ffn_i``. Each ``T̂`` approximates the transition from the chained basis to the
  trained one (``Â_iᵀ B_i``, then ``B̂_iᵀ A_{i+1}``), so approximation errors do not pile up along the
  layers: every step closes what it can of the remaining gap to the trained basis. At ``r = D`` the
  chain reproduces the trained bases (exact layer-wise); at ``r = 0`` every basis is ``A_0`` (a global
  rotation with identity transitions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..infra.errors import PipelineError
from ..infra.artifacts import tensor_digest_of
from .cayley import orthonormalize

RANK_MODES = ("adaptive", "full")
SUBSPACE_CHAINED = "chained"  # subspace artifact metadata: "true" (chained variant) or "false" (the paper's)


def transition_chain(n_layers: int) -> list[tuple[str, str, str]]:
    """Every residual add in stream order as ``(key, basis before, basis after)``:
    ``("attn.0", "A.0", "B.0"), ("ffn.0", "B.0", "A.1"), ...``; the transition is ``before.T @ after``."""
    chain = []
    for i in range(n_layers):
        chain.append((f"attn.{i}", f"A.{i}", f"B.{i}"))
        chain.append((f"ffn.{i}", f"B.{i}", f"A.{i + 1}"))
    return chain


@dataclass(frozen=True)
class ApproxSpec:
    """``rank``: an int in 0..D, ``"full"`` (= D) or ``"adaptive"`` (per transition, the smallest r
    whose captured energy ``Σ_{i≤r} σᵢ² / Σ σᵢ²`` reaches ``energy``)."""

    rank: int | str = 32
    energy: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            if self.rank not in RANK_MODES:
                raise PipelineError(f"approx.rank={self.rank}: give an integer >= 0, 'full' or 'adaptive'")
        elif isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise PipelineError(f"approx.rank={self.rank}: must be an integer >= 0, 'full' or 'adaptive'")
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0:
            raise PipelineError(f"approx.energy={self.energy}: must be in (0, 1]")

    @classmethod
    def from_cfg(cls, cfg) -> "ApproxSpec":
        known = {k: cfg[k] for k in ("rank", "energy") if k in cfg and cfg[k] is not None}
        return cls(**known)

    def rank_for(self, sigma: torch.Tensor) -> int:
        """The rank used for a transition with singular values ``sigma`` (D,), descending."""
        D = sigma.numel()
        if self.rank == "full":
            return D
        if self.rank == "adaptive":
            return adaptive_rank(sigma, self.energy)
        self.check_hidden(D)
        return int(self.rank)

    def check_hidden(self, hidden: int, setting: str = "", model: str = "") -> None:
        """Refuse an integer rank above the hidden size, in one line naming ``setting`` (default
        ``approx.rank=R``) and ``model``: the stages ask before any minutes-long work."""
        if isinstance(self.rank, int) and self.rank > hidden:
            of = f" of {model}" if model else ""
            raise PipelineError(f"{setting or f'approx.rank={self.rank}'} exceeds the hidden size {hidden}{of}")

    @property
    def label(self) -> str:
        return f"adaptive{self.energy:g}" if self.rank == "adaptive" else str(self.rank)


def adaptive_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r with ``Σ_{i≤r} σᵢ² / Σ σᵢ² >= energy`` (0 when ``T = I``)."""
    power = sigma.to(torch.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 0
    captured = torch.cumsum(power, 0) / total
    # a tiny tolerance: energy=1.0 must not demand more than float64 can add up to
    bound = torch.tensor(energy - 1e-12, dtype=torch.float64, device=captured.device)
    return int(torch.searchsorted(captured, bound).item()) + 1


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of a square ``a`` (its nearest orthogonal matrix), float64.

    LAPACK's divide-and-conquer SVD can fail, or silently lose accuracy, on the compressed transitions
    (their singular values come in repeated pairs), so the result is checked. The fallback is
    ``a (aᵀa)^(-1/2)`` from the symmetric eigensolver, polished by Newton steps ``X <- (X + X⁻ᵀ) / 2``.
    """
    if a.numel() == 0:
        return a.clone()
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    try:
        u, _, vh = torch.linalg.svd(a)
        X = u @ vh
        if (X.T @ X - eye).abs().max() <= 1e-12 and (X.T @ a - (X.T @ a).T).abs().max() <= 1e-12:
            return X  # orthogonal, and Xᵀa symmetric (its polar factor's defining property)
    except torch.linalg.LinAlgError:
        pass
    lam, V = torch.linalg.eigh(a.T @ a)
    if lam.min() <= lam.max() * 1e-24:
        raise PipelineError("a compressed transition is singular: its polar factor is not unique")
    X = a @ (V * lam.rsqrt()) @ V.T
    for _ in range(3):
        X = 0.5 * (X + torch.linalg.inv(X).T)
    return X


def singular_pairs(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (D, D) and singular values (D,), descending, of a normal ``delta``.

    ``ΔT = T - I`` of an orthogonal T is normal, so its left singular vectors are the eigenvectors of
    ``ΔT ΔTᵀ``: the symmetric eigensolver gives them reliably where the general SVD can fail to
    converge on the repeated pairs of singular values.
    """
    lam, V = torch.linalg.eigh(delta @ delta.T)
    order = torch.argsort(lam, descending=True)
    return V[:, order], lam[order].clamp(min=0).sqrt()


@dataclass
class Approximation:
    """One transition's subspace: ``Q`` (D, r), ``M`` (r, r) float64, and its quality figures."""

    Q: torch.Tensor
    M: torch.Tensor
    energy: float
    rel_error: float
    gap: float
    orth_error: float

    @property
    def rank(self) -> int:
        return self.Q.shape[1]


def approximate(T: torch.Tensor, spec: ApproxSpec) -> Approximation:
    """Rank-r subspace approximation of one transition ``T`` (D, D), computed in float64.

    Metrics: ``energy`` captured by the top r singular values of ``ΔT``; ``rel_error`` =
    ‖T̂ − T‖_F / ‖T − I‖_F (0 when T = I); ``gap`` = σ_r − σ_{r+1} (σ_0 = ∞, σ_{D+1} = 0): a gap near
    0 cuts a pair of equal singular values; ``orth_error`` = max |T̂ᵀT̂ − I|.
    """
    T = T.detach().to(torch.float64)
    D = T.shape[0]
    eye = torch.eye(D, dtype=torch.float64, device=T.device)
    U, sigma = singular_pairs(T - eye)
    r = spec.rank_for(sigma)
    Q = U[:, :r].contiguous()
    M = polar(Q.T @ T @ Q) - torch.eye(r, dtype=torch.float64, device=T.device)
    T_hat = eye + Q @ M @ Q.T
    power = sigma**2
    total = power.sum().item()
    norm_delta = math.sqrt(total)
    upper = sigma[r - 1].item() if r > 0 else math.inf
    lower = sigma[r].item() if r < D else 0.0
    return Approximation(
        Q=Q, M=M,
        energy=power[:r].sum().item() / total if total > 0 else 1.0,
        rel_error=torch.linalg.norm(T_hat - T).item() / norm_delta if norm_delta > 0 else 0.0,
        gap=upper - lower,
        orth_error=(T_hat.T @ T_hat - eye).abs().max().item(),
    )


def restore_float64(Q: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (float32) ``Q``, ``M`` made exact again in float64: orthonormal columns, orthogonal ``I + M``.

    The float32 round trip leaves ``T̂`` orthogonal to ~1e-7 only; this brings it back to ~1e-15.
    """
    Q64, M64 = Q.to(torch.float64), M.to(torch.float64)
    if Q64.shape[1] == 0:
        return Q64, M64
    q, r = torch.linalg.qr(Q64)
    q = q * torch.sign(torch.diagonal(r))  # keep each column's direction
    eye = torch.eye(M64.shape[0], dtype=torch.float64, device=M64.device)
    return q, polar(eye + M64) - eye


def check_subspace_variant(meta: Mapping[str, str], chained: bool, path) -> None:
    """Refuse (one line) a subspace artifact made for the other variant: the chained and the paper's
    ``Q``, ``M`` approximate different transitions. Artifacts from before the paper variant was added
    carry no mark and are chained."""
    made_chained = meta.get(SUBSPACE_CHAINED, "true") == "true"
    if made_chained != chained:
        made, want = ("chained", "paper") if made_chained else ("paper", "chained")
        raise PipelineError(f"{path} holds the {made} variant's subspace, this method fuses the {want} variant: "
                            "rerun the approximate stage")


def rotation_digest(rotations: dict[str, torch.Tensor]) -> str:
    """Names the exact per-layer rotation set a subspace was made from (fuse refuses a mismatch)."""
    return tensor_digest_of(rotations[k] for k in sorted(rotations))


def approximate_set(
    bases: dict[str, torch.Tensor], n_layers: int, spec: ApproxSpec, progress: bool = True,
    chained: bool = False,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Approximate every transition of the trained per-layer ``bases`` (``A.i``, ``B.i``: (D, D),
    float64, orthogonal): the trained transitions, or with ``chained`` those along the chain (module doc).

    Returns the subspace tensors ``Q.<key>`` (D, r) and ``M.<key>`` (r, r) (float64; the artifact
    stores float32) and one metrics row per transition; ``basis_error`` is ‖B̂ − B‖_F / √D between
    the basis the add leaves the stream in (``before @ T̂``) and the trained basis after it: in the
    chained variant the drift of the chained bases, in the paper's the mismatch each add leaves.
    """
    from tqdm.auto import tqdm

    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    current = bases["A.0"].to(torch.float64)
    chain = transition_chain(n_layers)
    desc = f"approximate{' chained' if chained else ''} r={spec.label}"
    for key, before, after in tqdm(chain, desc=desc, unit="transition", disable=not progress):
        if not chained:
            current = bases[before].to(torch.float64)
        target = bases[after].to(torch.float64)
        a = approximate(current.T @ target, spec)
        tensors[f"Q.{key}"], tensors[f"M.{key}"] = a.Q, a.M
        current = current + ((current @ a.Q) @ a.M) @ a.Q.T  # before @ T̂
        rows.append({"transition": key, "rank": a.rank, "energy": a.energy, "rel_error": a.rel_error,
                     "basis_error": torch.linalg.norm(current - target).item() / math.sqrt(target.shape[0]),
                     "sigma_gap": a.gap, "orth_error": a.orth_error})
    return tensors, rows


class _Orthonormalized(Mapping):
    """A rotation set's bases, each read and orthonormalised in float64 (on ``device``) when asked for:
    the chain needs one at a time, so a Llama-3-8B per-layer set is never all in memory."""

    def __init__(self, rotations: Mapping[str, torch.Tensor], device: torch.device | None) -> None:
        self.rotations, self.device = rotations, device
        self._keys = [k for k in rotations.keys() if not k.startswith("R2.")]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return orthonormalize(self.rotations[key].to(self.device, torch.float64))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def approximate_rotations(
    rotations: Mapping[str, torch.Tensor], n_layers: int, spec: ApproxSpec, progress: bool = True,
    device: torch.device | None = None, chained: bool = False,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """:func:`approximate_set` on a trained per-layer rotation set as stored (``A.i``, ``B.i`` (D, D),
    any float dtype; ``R2.*`` ignored; a lazy ``artifacts.LazyTensors`` too): each basis is read and
    orthonormalised in float64 on ``device`` (default: where it is stored) when the chain reaches it."""
    return approximate_set(_Orthonormalized(rotations, device), n_layers, spec, progress, chained)


def chained_bases(A0: torch.Tensor, Q: dict[str, torch.Tensor], M: dict[str, torch.Tensor],
                  n_layers: int) -> dict[str, torch.Tensor]:
    """The per-layer bases implied by ``A_0`` and the transitions ``T̂ = I + Q M Qᵀ`` (keys ``attn.i``,
    ``ffn.i``): ``A.0..A.L``, ``B.0..B.<L-1>``, (D, D), in ``A0``'s dtype."""
    out = {"A.0": A0}
    current = A0
    for key, _, after in transition_chain(n_layers):
        current = current + ((current @ Q[key]) @ M[key]) @ Q[key].T
        out[after] = current
    return out


def summarize(rows: list[dict]) -> dict[str, float | None]:
    """Mean rank, energy and error over the transitions; worst orthogonality; smallest finite gap."""
    n = len(rows)
    gaps = [r["sigma_gap"] for r in rows if math.isfinite(r["sigma_gap"])]
    return {
        "approx_mean_rank": sum(r["rank"] for r in rows) / n,
        "approx_mean_energy": sum(r["energy"] for r in rows) / n,
        "approx_mean_rel_error": sum(r["rel_error"] for r in rows) / n,
        "approx_max_rel_error": max(r["rel_error"] for r in rows),
        "approx_max_orth_error": max(r["orth_error"] for r in rows),
        "approx_mean_basis_error": sum(r["basis_error"] for r in rows) / n,
        "approx_min_sigma_gap": min(gaps) if gaps else None,  # r = 0 or full rank everywhere: no gap
    }
