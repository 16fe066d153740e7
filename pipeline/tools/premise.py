"""The premise diagnostic: is the data's push on ΔT low-rank? ``python -m pipeline.tools.premise --windows 4 16 64 256``.

ReSpinQuant approximates each transition's ``ΔT = T - I`` by its top-r singular subspace (DESIGN §1).
Trained on few windows, the per-layer bases drift by noise, which alone makes ΔT high-rank; this asks
whether the part of ΔT the *data* asks for is low-rank, and how that changes with more data.

What is measured, at the start of per-layer training (every ``A_i``, ``B_i`` equal to the global R1, so
every ``T = I``; R1, R2 are the untrained random Hadamards of ``method=layerwise`` at the seed, i.e. the
QuaRot set that SpinQuant's training starts from, not SpinQuant's trained set):

- for each calibration window, the Euclidean gradient ``G_X`` of the training loss (next-token CE with the
  training's fake quantization: activations and KV at ``quant``, weights 16-bit, as
  ``rotate_layerwise`` with ``train.quantize_weights=false``) w.r.t. every basis ``X``;
- the Cayley SGD direction of each basis, ``W_X = skew(-G_X X^T + ½ X X^T G_X X^T)`` (``cayley_direction``,
  the optimizer's ``W`` with zero momentum): the first step moves ``X -> X + a W_X X``;
- the first-order direction of each transition: ``T = A^T B -> T + a A^T (W_B - W_A) B``, i.e.
  ``dT = A^T (W_B - W_A) B`` (D, D), skew-symmetric at the start (``A = B``). Everything is linear in
  ``G``, so the mean direction over N windows is the direction of the mean gradient.

Per transition (2L of them) and N windows: the energy the top-r singular values capture,
``Σ_{i≤r} σ_i² / Σ σ_i²`` of the mean ``dT`` (``captured_energy``; σ come in pairs, r = 32 cuts none),
and the split-half agreement of the top-r left singular subspaces ``‖Q_1^T Q_2‖_F² / r`` between the
mean ``dT`` of the even and the odd windows (``subspace_agreement``; 1 = the same subspace, ``r / D`` on
average for unrelated ones). Also reported: the same for the optimizer's first step at the training's lr
(``a_X = min(lr, 1 / ‖W_X‖)`` per basis, ``dT = A^T (a_B W_B - a_A W_A) B``), the energy of single
windows' directions (the noise floor), that of a random skew-symmetric Gaussian matrix (no structure),
and the signal share ``<dT_even, dT_odd> / ‖dT_all‖²`` (``signal_share``: how much of the mean direction
is the data's common direction rather than window-to-window noise).

Cells: each N is one result in the JSON file (``--out``), keyed by model, N, seed and the hash of the
config; a present key is skipped. The windows are a seeded sample (``data.sample_windows``, as
calibrate draws them) whose first N are the N-window sample, so one running sum serves every N: it is
kept in ``--scratch`` (saved every few windows) and a killed run resumes from it, losing at most the
windows since the last save. ``--deadline MIN`` stops before a cell whose estimated time (the measured
seconds per window) would end past it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..infra.artifacts import load_tensors, save_tensors, write_json
from ..infra.config import REPO_ROOT
from ..infra.errors import PipelineError, cli_errors_as_one_line
from ..methods import MethodSpec, make_rotations, prepare_base, quant_spec
from ..quant.quantizers import QuantSpec
from ..rotation.subspace import transition_chain
from ..train.loop import window_loss
from ..train.trainable import TrainableRotations, parametrize_rotations

RANK = 32
PROFILE_RANKS = (2, 4, 8, 16, 32, 64, 128)  # ranks of the by-rank profile (energy, agreement, held-out energy)
LR = 1.5  # the training's Cayley SGD lr (conf/train/*.yaml), for the first-step variant
Q_BOUND = 0.5  # CayleySGD's q: a = min(lr, 2q / ||W||)
SCHEMA = 1  # bump when what a result means changes (it enters the config hash)
SINGLE_WINDOWS = 4  # windows whose own direction is measured (the noise floor)
DEFAULT_SECONDS_PER_WINDOW = 20.0  # estimate before any window is timed (SmolLM2-135M, 512 tokens, 2 busy cores)
SAVE_EVERY = 4  # windows between saves of the running sums


# ---------------------------------------------------------------------------------------------------
# directions and spectra


def cayley_direction(grad: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """CayleySGD's skew-symmetric direction ``W`` (n, n) for Euclidean gradient ``grad`` at an orthogonal
    ``X`` (n, n), zero momentum; float64. The optimizer's ``Ŵ = M X^T - ½ X (X^T M X^T)``, ``M = -grad``,
    ``W = Ŵ - Ŵ^T`` is, for square orthogonal ``X`` (``X X^T = I``), ``W = ½ (P - P^T)`` with
    ``P = M X^T``: one product instead of four. The step moves ``X`` to ``X + a W X`` to first order."""
    P = -grad.to(torch.float64) @ X.to(torch.float64).T
    return 0.5 * (P - P.T)


def step_size(W: torch.Tensor, lr: float = LR, q: float = Q_BOUND, eps: float = 1e-8) -> float:
    """CayleySGD's step ``a = min(lr, 2q / (‖W‖_F + eps))``."""
    return min(lr, 2 * q / (W.norm().item() + eps))


def basis_directions(grads: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cayley_direction`` of every basis in ``grads`` ((D, D) each), float64."""
    return {k: cayley_direction(g, bases[k]) for k, g in grads.items()}


def transition_directions(W: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor], n_layers: int,
                          lr: float | None = None) -> dict[str, torch.Tensor]:
    """The first-order change of every transition under one Cayley step, keys ``attn.<i>``, ``ffn.<i>``.

    ``W``: the bases' directions (``basis_directions``), ``bases``: the bases, (D, D) each, names
    ``A.0..A.L``, ``B.0..B.<L-1>``. With ``lr=None`` the gradient-flow direction ``dT = A^T (W_B - W_A) B``
    (every basis the same step); with ``lr`` the optimizer's first step ``A^T (a_B W_B - a_A W_A) B``,
    ``a_X = step_size(W_X, lr)``. Float64 (D, D); skew-symmetric where ``A = B`` (the start of per-layer
    training).
    """
    scale = {k: 1.0 if lr is None else step_size(w, lr) for k, w in W.items()}
    out = {}
    for key, before, after in transition_chain(n_layers):
        A, B = bases[before].to(torch.float64), bases[after].to(torch.float64)
        out[key] = A.T @ (scale[after] * W[after] - scale[before] * W[before]) @ B
    return out


def _gram_spectrum(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of ``delta @ delta.T``: the squared
    singular values of ``delta`` and its left singular vectors (a symmetric eigensolver, several times
    faster than an SVD)."""
    d = delta.to(torch.float64)
    evals, evecs = torch.linalg.eigh(d @ d.T)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def captured_energy(delta: torch.Tensor, r: int) -> float:
    """``Σ_{i≤r} σ_i² / Σ σ_i²`` of ``delta`` (D, D) in float64; 1.0 at ``r >= D`` and for ``delta = 0``."""
    d = delta.to(torch.float64)
    power = torch.linalg.eigvalsh(d @ d.T).flip(0).clamp_min(0.0)
    total = power.sum().item()
    return 1.0 if total <= 0 else min(1.0, power[:r].sum().item() / total)


def top_subspace(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r left singular vectors of ``delta`` (D, D) as (D, r), float64 (any orthonormal basis of
    that subspace: a skew matrix's singular values come in equal pairs)."""
    return _gram_spectrum(delta)[1][:, :r]


def subspace_agreement(delta_1: torch.Tensor, delta_2: torch.Tensor, r: int) -> float:
    """``‖Q_1^T Q_2‖_F² / r`` of the top-r left singular subspaces of two (D, D) matrices: 1 for the same
    subspace, 0 for orthogonal ones, ``r / D`` expected for unrelated random ones."""
    Q1, Q2 = top_subspace(delta_1, r), top_subspace(delta_2, r)
    return (Q1.T @ Q2).pow(2).sum().item() / Q1.shape[1]


def signal_share(delta_even: torch.Tensor, delta_odd: torch.Tensor, delta_all: torch.Tensor) -> float:
    """``<Δ_even, Δ_odd>_F / ‖Δ_all‖_F²``: the share of the mean direction's squared norm that both
    halves have in common. With ``Δ = s + noise`` (independent per window, variance ``σ²`` each), the
    numerator estimates ``‖s‖²`` without bias and the denominator ``‖s‖² + σ²/N``: near 1 when the data's
    direction dominates, near 0 (either sign) when noise does."""
    total = delta_all.to(torch.float64).pow(2).sum().item()
    cross = (delta_even.to(torch.float64) * delta_odd.to(torch.float64)).sum().item()
    return 0.0 if total <= 0 else cross / total


def split_half_profile(delta_all: torch.Tensor, delta_even: torch.Tensor, delta_odd: torch.Tensor,
                       ranks: Iterable[int]) -> dict[int, dict[str, float]]:
    """Per rank r, from one eigendecomposition per matrix ((D, D) each): ``energy`` (``captured_energy``
    of ``delta_all``), ``agreement`` (``subspace_agreement`` of the halves) and ``heldout`` energy: the
    share of one half's squared norm inside the other half's top-r subspace, ``‖Q_even^T Δ_odd‖² / ‖Δ_odd‖²``
    averaged with the swap. The held-out energy is what a subspace chosen on one sample captures of
    another: noise in the choosing half cannot inflate it, unlike ``energy``."""
    power = torch.linalg.eigvalsh(delta_all.to(torch.float64) @ delta_all.to(torch.float64).T).flip(0).clamp_min(0.0)
    _, Q_even = _gram_spectrum(delta_even)
    _, Q_odd = _gram_spectrum(delta_odd)
    d_even, d_odd = delta_even.to(torch.float64), delta_odd.to(torch.float64)
    n_even, n_odd, total = d_even.pow(2).sum().item(), d_odd.pow(2).sum().item(), power.sum().item()
    in_odd = (Q_even.T @ d_odd).pow(2).sum(dim=1).cumsum(0)  # energy of Δ_odd in Q_even[:, :r], every r
    in_even = (Q_odd.T @ d_even).pow(2).sum(dim=1).cumsum(0)
    out = {}
    for r in ranks:
        k = min(r, power.numel())  # r >= D: everything
        heldout = 0.5 * ((in_odd[k - 1].item() / n_odd if n_odd > 0 else 1.0)
                         + (in_even[k - 1].item() / n_even if n_even > 0 else 1.0))
        out[r] = {"energy": 1.0 if total <= 0 else min(1.0, power[:k].sum().item() / total),
                  "agreement": (Q_even[:, :k].T @ Q_odd[:, :k]).pow(2).sum().item() / k,
                  "heldout": min(1.0, heldout)}
    return out


def random_skew_energy(dim: int, r: int, seed: int = 0) -> float:
    """``captured_energy`` of a random skew-symmetric Gaussian (dim, dim) matrix (no low-rank structure)."""
    G = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return captured_energy(G - G.T, r)


def quantiles(values: Iterable[float]) -> dict[str, float]:
    """``median``, ``q25``, ``q75``, ``min``, ``max`` of ``values`` (over transitions)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": q[1], "q25": q[0], "q75": q[2], "min": t.min().item(), "max": t.max().item()}


# ---------------------------------------------------------------------------------------------------
# gradients over windows


@dataclass
class GradientSums:
    """Running sums of the bases' gradients over windows ``0..n-1``: ``even`` over the even-numbered
    windows, ``odd`` over the odd ones ((D, D) float64 per basis), the windows' losses and seconds, and
    the per-transition energies of the first ``SINGLE_WINDOWS`` windows' own directions."""

    even: dict[str, torch.Tensor] = field(default_factory=dict)
    odd: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    single: list[list[float]] = field(default_factory=list)

    def add(self, grads: Mapping[str, torch.Tensor]) -> None:
        half = self.even if self.n % 2 == 0 else self.odd
        for k, g in grads.items():
            g = g.detach().to(device="cpu", dtype=torch.float64)
            half[k] = half[k] + g if k in half else g.clone()
        self.n += 1

    def means(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mean gradients over all windows, the even ones and the odd ones (the odd mean needs n >= 2)."""
        if self.n < 2:
            raise PipelineError(f"{self.n} window(s) summed: the split-half needs at least 2")
        n_even, n_odd = (self.n + 1) // 2, self.n // 2
        total = {k: (self.even[k] + self.odd[k]) / self.n for k in self.even}
        return total, {k: v / n_even for k, v in self.even.items()}, {k: v / n_odd for k, v in self.odd.items()}

    def save(self, path: Path, signature: str) -> None:
        tensors = {f"even/{k}": v for k, v in self.even.items()}
        tensors.update({f"odd/{k}": v for k, v in self.odd.items()})
        meta = {"fingerprint": "premise", "signature": signature, "n": str(self.n), "losses": json.dumps(self.losses),
                "seconds": json.dumps(self.seconds), "single": json.dumps(self.single)}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Path, signature: str) -> GradientSums:
        """The sums saved at ``path`` for this very config (``signature``), else empty ones."""
        if not path.is_file():
            return cls()
        tensors, meta = load_tensors(path)
        if meta.get("signature") != signature:
            return cls()
        even = {k[5:]: v for k, v in tensors.items() if k.startswith("even/")}
        odd = {k[4:]: v for k, v in tensors.items() if k.startswith("odd/")}
        return cls(even, odd, int(meta["n"]), json.loads(meta["losses"]), json.loads(meta["seconds"]),
                   json.loads(meta["single"]))


def premise_model(model: nn.Module, method: MethodSpec, quant: QuantSpec,
                  device: torch.device | str = "cpu") -> tuple[TrainableRotations, int]:
    """Prepare ``model`` in place (and move it to ``device``) as ``rotate_layerwise`` trains it, at the
    start of that training.

    ``method``: a per-layer method (``layerwise``); its untrained set (every ``A.i``, ``B.i`` = R1, R2 per
    layer) is the starting point. ``quant``: the training quantizers (its ``w_bits`` is ignored: weights
    stay 16-bit, as with ``train.quantize_weights=false``). Only the bases get gradients (R2 is frozen:
    it enters no transition). Returns the rotations and the number of decoder layers.
    """
    if not method.per_layer:
        raise PipelineError(f"method {method.name} has no per-layer bases: the premise diagnostic needs one (layerwise)")
    train_quant = replace(quant, w_bits=16)
    init = make_rotations(method, model)
    adapter = prepare_base(model, method, train_quant)
    model.to(device)
    rotations = TrainableRotations(init).to(device)
    for name, p in rotations.as_dict().items():
        p.requires_grad_(name[:2] in ("A.", "B."))
    parametrize_rotations(model, adapter, rotations, train_quant)
    return rotations, adapter.dims(model).n_layers


def window_gradients(model: nn.Module, rotations: TrainableRotations, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """The bases' Euclidean gradients (float32, (D, D) each) of one window's loss, and the loss.

    ``ids``: (seqlen,) token ids on the model's device."""
    for p in rotations.mats:
        p.grad = None
    loss = window_loss(model, ids)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in rotations.as_dict().items() if p.requires_grad}
    for p in rotations.mats:
        p.grad = None
    return grads, loss.item()


def accumulate(model: nn.Module, rotations: TrainableRotations, n_layers: int, windows: torch.Tensor,
               sums: GradientSums, stop: int, rank: int = RANK,
               after_window: Callable[[GradientSums], None] | None = None) -> GradientSums:
    """Add windows ``sums.n .. stop-1`` of ``windows`` ((n, seqlen)) to ``sums`` (and each one's
    gradient seconds); the first ``SINGLE_WINDOWS`` also get their own direction's per-transition energy.
    ``after_window(sums)`` runs after each window (the caller's periodic save)."""
    bases = {k: v.detach() for k, v in rotations.as_dict().items()}
    while sums.n < stop:
        start = time.perf_counter()
        grads, loss = window_gradients(model, rotations, windows[sums.n])
        seconds = time.perf_counter() - start  # the gradient only: what the estimate of later windows needs
        if sums.n < SINGLE_WINDOWS:
            deltas = transition_directions(basis_directions(grads, bases), bases, n_layers)
            sums.single.append([captured_energy(d, rank) for d in deltas.values()])
        sums.add(grads)
        sums.losses.append(loss)
        sums.seconds.append(seconds)
        if after_window is not None:
            after_window(sums)
    return sums


def premise_metrics(sums: GradientSums, bases: Mapping[str, torch.Tensor], n_layers: int, rank: int = RANK,
                    lr: float = LR) -> dict:
    """A cell's numbers from ``sums`` (n >= 2 windows): per transition and summarised over them (quantiles),
    the captured energy of the mean direction and the even/odd split-half agreement, for the gradient
    flow (``energy``, ``agreement``) and the optimizer's first step (``step_energy``, ``step_agreement``);
    for the gradient flow also the held-out energy, the signal share and ``by_rank`` (quantiles of energy,
    agreement and held-out energy at each of ``PROFILE_RANKS``); the single-window energies
    (``single_energy``, over the first windows and transitions) and references."""
    total, even, odd = sums.means()
    out: dict = {"transitions": [k for k, _, _ in transition_chain(n_layers)]}
    W_all, W_even, W_odd = (basis_directions(g, bases) for g in (total, even, odd))
    keys = out["transitions"]
    for prefix, step_lr in (("", None), ("step_", lr)):
        d_all = transition_directions(W_all, bases, n_layers, step_lr)
        d_even = transition_directions(W_even, bases, n_layers, step_lr)
        d_odd = transition_directions(W_odd, bases, n_layers, step_lr)
        if prefix == "":
            ranks = sorted({*PROFILE_RANKS, rank})
            profiles = [split_half_profile(d_all[k], d_even[k], d_odd[k], ranks) for k in keys]
            energy = [p[rank]["energy"] for p in profiles]
            agree = [p[rank]["agreement"] for p in profiles]
            heldout = [p[rank]["heldout"] for p in profiles]
            out["heldout_energy"], out["heldout_energy_per_transition"] = quantiles(heldout), heldout
            out["by_rank"] = {str(r): {m: quantiles(p[r][m] for p in profiles) for m in ("energy", "agreement", "heldout")}
                              for r in ranks if r <= d_all[keys[0]].shape[0]}
        else:
            energy = [captured_energy(d_all[k], rank) for k in keys]
            agree = [subspace_agreement(d_even[k], d_odd[k], rank) for k in keys]
        out[f"{prefix}energy"], out[f"{prefix}agreement"] = quantiles(energy), quantiles(agree)
        out[f"{prefix}energy_per_transition"], out[f"{prefix}agreement_per_transition"] = energy, agree
        if prefix == "":
            out["direction_norm_per_transition"] = [d_all[k].norm().item() for k in out["transitions"]]
            share = [signal_share(d_even[k], d_odd[k], d_all[k]) for k in out["transitions"]]
            out["signal_share"], out["signal_share_per_transition"] = quantiles(share), share
            out["basis_direction_norm_max"] = max(w.norm().item() for w in W_all.values())
            out["skew_error"] = max((d + d.T).abs().max().item() / max(d.abs().max().item(), 1e-300)
                                    for d in d_all.values())
    if sums.single:
        out["single_energy"] = quantiles(e for window in sums.single for e in window)
        out["single_windows"] = len(sums.single)
    dim = next(iter(bases.values())).shape[0]
    out["random_energy"] = random_skew_energy(dim, rank)
    out["random_agreement"] = rank / dim
    out["hidden"], out["rank"] = dim, rank
    if sums.losses:
        out["loss_mean"] = sum(sums.losses) / len(sums.losses)
    return out


# ---------------------------------------------------------------------------------------------------
# cells


def compose(model: str, quant: str, data: str, seed: int, dtype: str) -> DictConfig:
    """The pipeline config of the diagnostic: ``method=layerwise`` on ``model``/``quant``/``data``, one
    line naming the bad option otherwise."""
    from hydra.errors import HydraException

    from ..infra.config import compose_pipeline

    try:
        cfg = compose_pipeline([f"model={model}", f"quant={quant}", f"data={data}", "method=layerwise",
                                f"seed={seed}", f"model.dtype={dtype}"])
    except HydraException as exc:
        raise PipelineError(f"bad --model/--quant/--data ({str(exc).splitlines()[0][:160]})") from None
    return cfg


def config_of(cfg: DictConfig, seqlen: int, rank: int, text_sha256: str) -> dict:
    """What a result depends on (hashed into its key; never where or how fast it ran)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("cache_dir", None)  # where the weights are cached, not which weights
    return {"schema": SCHEMA, "model": model, "quant": OmegaConf.to_container(cfg.quant, resolve=True),
            "method": OmegaConf.to_container(cfg.method, resolve=True), "seed": int(cfg.seed),
            "calib_source": cfg.data.calib_source, "calib_text_sha256": text_sha256, "seqlen": seqlen,
            "rank": rank, "lr": LR, "single_windows": SINGLE_WINDOWS}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def result_key(model: str, n: int, seed: int, digest: str) -> str:
    return f"{model}/N{n}/seed{seed}/{digest[:12]}"


def read_results(path: Path) -> dict:
    """The results file (``{"results": {key: result}}``), empty when absent; one line if unreadable."""
    if not path.is_file():
        return {"results": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise PipelineError(f"{path}: not a premise results file (no `results` object)")
    return data


def merge_result(path: Path, key: str, result: dict) -> None:
    """Add ``result`` under ``key`` to the results file (re-read first: another run may have written)."""
    data = read_results(path)
    data["results"][key] = result
    data["results"] = dict(sorted(data["results"].items(), key=lambda kv: (kv[1]["model"], kv[1]["seed"], kv[1]["windows"])))
    write_json(path, data)


def check_windows(values: list[int]) -> list[int]:
    if not values or any(isinstance(v, bool) or v < 2 for v in values):
        raise PipelineError(f"--windows {' '.join(map(str, values))}: give window counts >= 2 (the split-half needs two)")
    return sorted(set(values))


@dataclass
class Plan:
    """What the CLI runs: the cells (window counts) in order, and where they go."""

    counts: list[int]
    out: Path
    scratch: Path
    deadline_s: float | None
    rank: int = RANK
    seqlen: int = 512
    device: str = "cpu"


def estimate_seconds(need: int, sums: GradientSums, results: dict, digest: str) -> float:
    """Seconds for ``need`` more windows: the measured mean (after the first, warm-up), else that of an
    earlier result of this config, else ``DEFAULT_SECONDS_PER_WINDOW``."""
    timed = sums.seconds[1:] or sums.seconds
    if timed:
        per = sum(timed) / len(timed)
    else:
        earlier = [r["seconds_per_window"] for r in results["results"].values() if r.get("config_sha256") == digest]
        per = earlier[-1] if earlier else DEFAULT_SECONDS_PER_WINDOW
    return need * per


def run_cells(plan: Plan, cfg: DictConfig, load: Callable[[], tuple[nn.Module, object]],
              clock: Callable[[], float] = time.monotonic) -> list[str]:
    """Run every cell of ``plan`` not already in ``plan.out``; returns the keys written.

    ``load()`` gives ``(model, tokenizer)``, called once, at the first cell not yet in ``plan.out``.
    """
    from .cells import git_commit, host_cpu
    from ..eval.data import calibration_text, sample_windows, text_digest, tokenize

    begin = clock()
    text = calibration_text(cfg.data)
    config = config_of(cfg, plan.seqlen, plan.rank, text_digest(text))
    digest = config_hash(config)
    name, seed = str(cfg.model.name), int(cfg.seed)
    state_path = plan.scratch / f"{name}-seed{seed}-{digest[:12]}.safetensors"
    sums = GradientSums.load(state_path, digest)
    ready: tuple | None = None  # (model, rotations, n_layers, windows)
    written = []
    for n in plan.counts:
        key = result_key(name, n, seed, digest)
        if key in read_results(plan.out)["results"]:
            print(f"N={n}: done already ({key})", flush=True)
            continue
        fresh = sums.n > n  # the running sums are past n: this cell sums its own windows, unsaved
        cell_sums = GradientSums() if fresh else sums
        need = n - cell_sums.n
        estimate = estimate_seconds(need, sums, read_results(plan.out), digest)
        if plan.deadline_s is not None and clock() - begin + estimate > plan.deadline_s:
            left = (plan.deadline_s - (clock() - begin)) / 60
            print(f"deadline: {left:.1f} min left, N={n} needs ~{estimate / 60:.1f} min ({need} windows): stopping",
                  flush=True)
            break
        print(f"N={n}: {need} window(s) to compute, ~{estimate / 60:.1f} min", flush=True)
        if ready is None:
            model, tok = load()
            windows = sample_windows(tokenize(text, tok), max(plan.counts), plan.seqlen, seed).to(plan.device)
            rotations, n_layers = premise_model(model, MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant),
                                                plan.device)
            ready = (model, rotations, n_layers, windows)
        model, rotations, n_layers, windows = ready

        def save(s: GradientSums, fresh: bool = fresh, n: int = n) -> None:
            if not fresh and (s.n % SAVE_EVERY == 0 or s.n == n):
                s.save(state_path, digest)
            print(f"  window {s.n}/{n}: loss {s.losses[-1]:.4f}, {s.seconds[-1]:.1f} s", flush=True)

        accumulate(model, rotations, n_layers, windows, cell_sums, n, plan.rank, save)
        bases = {k: v.detach().cpu() for k, v in rotations.as_dict().items() if k[:2] in ("A.", "B.")}
        metrics = premise_metrics(cell_sums, bases, n_layers, plan.rank)
        timed = cell_sums.seconds[1:] or cell_sums.seconds
        result = {"model": name, "windows": n, "seed": seed, "seqlen": plan.seqlen, "dtype": str(cfg.model.dtype),
                  "device": str(plan.device), **metrics, "seconds_per_window": sum(timed) / len(timed),
                  "commit": git_commit(), "host_cpu": host_cpu(),
                  "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "config_sha256": digest, "config": config}
        merge_result(plan.out, key, result)
        written.append(key)
        e, a = metrics["energy"], metrics["agreement"]
        print(f"N={n}: energy@{plan.rank} median {e['median']:.3f} [{e['q25']:.3f}, {e['q75']:.3f}], split-half "
              f"agreement median {a['median']:.3f} [{a['q25']:.3f}, {a['q75']:.3f}] -> {plan.out}", flush=True)
    return written


def table(results_path: Path, model: str | None = None) -> list[str]:
    """The results file as markdown rows, one per (model, seed, config, N): median [q25, q75] over the
    transitions of the energy at r and of the split-half agreement, the single-window energy, seconds."""
    rows = sorted((r for r in read_results(results_path)["results"].values() if model is None or r["model"] == model),
                  key=lambda r: (r["model"], r["seed"], r["config_sha256"], r["windows"]))
    if not rows:
        raise PipelineError(f"{results_path}: no results{f' of {model}' if model else ''}")

    def cell(q: dict) -> str:
        return f"{q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]"

    r0 = rows[0]
    out = [(f"| model | seed | config | N | energy in top {r0['rank']} | split-half agreement | signal share "
           "| one window's energy | s/window | device |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        single = cell(r["single_energy"]) if "single_energy" in r else "-"
        share = cell(r["signal_share"]) if "signal_share" in r else "-"
        out.append(f"| {r['model']} | {r['seed']} | {r['config_sha256'][:8]} | {r['windows']} | {cell(r['energy'])} | "
                   f"{cell(r['agreement'])} | {share} | {single} | {r['seconds_per_window']:.1f} | {r.get('device', '-')} |")
    out.append(f"\nreferences: a random skew-symmetric {r0['hidden']}x{r0['hidden']} matrix puts "
               f"{r0['random_energy']:.3f} of its energy in its top {r0['rank']}; unrelated subspaces agree "
               f"{r0['random_agreement']:.3f} (r/D) on average")
    return out


# ---------------------------------------------------------------------------------------------------
# plot


def plot(results_path: Path, out: Path, model: str | None = None) -> Path:
    """PNG via matplotlib. Left: energy of the mean direction in its top r vs N (median and IQR over the
    transitions; held-out energy, one window's energy and a random skew matrix for reference). Middle:
    split-half agreement of the top-r subspaces and the signal share vs N. Right (when the results have
    the by-rank profile): held-out energy and agreement vs r, one line per N. The first Cayley step's
    numbers are in the JSON only (equal to the gradient's while every ``a_X = lr``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipelineError("matplotlib is not installed: no plot written (the JSON has every number)") from None
    rows = [r for r in read_results(results_path)["results"].values() if model is None or r["model"] == model]
    if not rows:
        raise PipelineError(f"{results_path}: no results{f' of {model}' if model else ''} to plot")
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["model"], r["seed"], r["config_sha256"][:8]), []).append(r)
    profiled = [r for r in rows if "by_rank" in r]
    fig, axes = plt.subplots(1, 3 if profiled else 2, figsize=(15 if profiled else 10, 4.2))
    r0 = rows[0]
    for (name, seed, digest), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["windows"])
        n = [r["windows"] for r in rs]
        label = f"{name} seed {seed} ({digest})" if len(series) > 1 else ""
        for ax, field_, title in ((axes[0], "energy", "energy of the mean direction"),
                                  (axes[1], "agreement", "split-half agreement")):
            ax.plot(n, [r[field_]["median"] for r in rs], "o-", label=f"{label} {title} (median, IQR)".strip())
            ax.fill_between(n, [r[field_]["q25"] for r in rs], [r[field_]["q75"] for r in rs], alpha=0.2)
        held = [(r["windows"], r["heldout_energy"]["median"]) for r in rs if "heldout_energy" in r]
        if held:
            axes[0].plot(*zip(*held), "s--", label=f"{label} held-out energy (median)".strip())
        share = [(r["windows"], r["signal_share"]["median"]) for r in rs if "signal_share" in r]
        if share:
            axes[1].plot(*zip(*share), "^--", label=f"{label} signal share (median)".strip())
        floor = [r["single_energy"]["median"] for r in rs if "single_energy" in r]
        if floor:
            axes[0].axhline(floor[-1], color="gray", ls=":", label="one window's energy (median)")
    axes[0].axhline(r0["random_energy"], color="k", ls="-.", lw=0.8, label="random skew matrix")
    axes[1].axhline(r0["random_agreement"], color="k", ls="-.", lw=0.8, label="unrelated subspaces (r/D)")
    axes[0].set_title(f"ΔT direction: energy in its top {r0['rank']} (of {r0['hidden']})", fontsize=10)
    axes[1].set_title(f"top-{r0['rank']} subspaces of two halves; signal share", fontsize=10)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"calibration windows N ({r0['seqlen']} tokens each)")
    if profiled:
        ax = axes[2]
        for i, r in enumerate(sorted(profiled, key=lambda r: r["windows"])):
            ranks = sorted(int(k) for k in r["by_rank"])
            color = f"C{i}"
            ax.plot(ranks, [r["by_rank"][str(k)]["heldout"]["median"] for k in ranks], "o-", color=color,
                    label=f"N={r['windows']} held-out energy")
            ax.plot(ranks, [r["by_rank"][str(k)]["agreement"]["median"] for k in ranks], "x--", color=color,
                    label=f"N={r['windows']} agreement")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title("by rank (medians over transitions)", fontsize=10)
    for ax in axes:
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 16, 64, 256], help="window counts N, one cell each")
    parser.add_argument("--model", default="smollm2_135m", help="conf/model/<name>.yaml")
    parser.add_argument("--quant", default="w4a4kv4", help="conf/quant/<name>.yaml (activations and KV; weights stay 16-bit)")
    parser.add_argument("--data", default="enwiki", help="conf/data/<name>.yaml (the calibration text)")
    parser.add_argument("--seed", type=int, default=0, help="the window sample and the Hadamard signs")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--rank", type=int, default=RANK, help="r")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (pinned, not auto: one config on every host)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (not in the config hash)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 is far faster on a CPU shared with other jobs)")
    parser.add_argument("--out", default="docs/premise.json", help="results file (merged, keyed by model, N, seed, config)")
    parser.add_argument("--plot", default=None, help="PNG of the results file's numbers (written after the cells)")
    parser.add_argument("--scratch", default="runs/premise", help="the running gradient sums (resume)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="minutes from now: start no cell whose estimated time ends past it")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print --out as a markdown table (and redraw --plot if given)")
    args = parser.parse_args(argv)

    def body(a: argparse.Namespace) -> None:
        if a.deadline is not None and not a.deadline > 0:
            raise PipelineError(f"--deadline {a.deadline}: give minutes > 0")
        if a.rank < 1:
            raise PipelineError(f"--rank {a.rank}: must be >= 1")
        if a.seqlen < 2:
            raise PipelineError(f"--seqlen {a.seqlen}: must be >= 2")
        if a.seed < 0:
            raise PipelineError(f"--seed {a.seed}: must be >= 0")
        if a.threads is not None:
            if a.threads < 1:
                raise PipelineError(f"--threads {a.threads}: must be >= 1")
            torch.set_num_threads(a.threads)
        out = REPO_ROOT / a.out if not Path(a.out).is_absolute() else Path(a.out)
        plot_path = None if a.plot is None else (REPO_ROOT / a.plot if not Path(a.plot).is_absolute() else Path(a.plot))
        if a.report:
            print("\n".join(table(out)))
            if plot_path is not None:
                print(f"wrote {plot(out, plot_path)}")
            return
        counts = check_windows(a.windows)
        read_results(out)  # a broken results file is refused before any work
        cfg = compose(a.model, a.quant, a.data, a.seed, a.dtype)
        from ..eval.data import check_seqlen
        from ..infra.devices import resolve_device
        from ..model.load import load_model, max_positions

        def load():
            model, tok = load_model(cfg.model)
            check_seqlen(a.seqlen, max_positions(model), "--seqlen")
            return model, tok

        scratch = REPO_ROOT / a.scratch if not Path(a.scratch).is_absolute() else Path(a.scratch)
        device = resolve_device(a.device, "--device")
        plan = Plan(counts, out, scratch, None if a.deadline is None else a.deadline * 60, a.rank, a.seqlen,
                    str(device))
        written = run_cells(plan, cfg, load)
        print(f"{len(written)} result(s) written to {out}", flush=True)
        if plot_path is not None:
            try:
                print(f"wrote {plot(out, plot_path, str(cfg.model.name))}")
            except PipelineError as exc:
                print(f"no plot: {exc}")

    cli_errors_as_one_line(body, args)


if __name__ == "__main__":
    main()
