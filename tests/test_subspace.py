"""Residual subspace approximation: orthogonality, limits r = 0 and r = D, adaptive rank, and the
rank-r online transitions inside a fused model (float64, quantization off)."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from pipeline.model.adapters import adapter_for
from pipeline.rotation.cayley import orthonormalize
from pipeline.infra.errors import PipelineError
from pipeline.methods import MethodSpec, check_subspace, prepare_model
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.surgery.weights import replace_norms
from pipeline.rotation.subspace import ApproxSpec, adaptive_rank, approximate, approximate_set, restore_float64
from pipeline.surgery.transitions import LowRankTransitions
from helpers import LAYERWISE, MODELS, RESPIN, f64_model, low_rank_subspace, max_rel_error, model_logits, random_per_layer_set

D = 48


def _near_identity_rotation(seed: int, n: int = D, planes: int = 6) -> torch.Tensor:
    """An orthogonal T = exp(S): a few large rotation planes plus small noise (ΔT of low effective rank)."""
    g = torch.Generator().manual_seed(seed)
    S = 0.01 * torch.randn(n, n, generator=g, dtype=torch.float64)
    for p in range(planes):
        S[2 * p, 2 * p + 1] += 0.3 + 0.2 * p
    basis = orthonormalize(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = basis @ (S - S.T) @ basis.T
    return torch.linalg.matrix_exp(S)


@pytest.mark.parametrize("rank", [0, 1, 5, 12, 31, D])
def test_approximation_is_orthogonal(rank):
    a = approximate(_near_identity_rotation(0), ApproxSpec(rank=rank))
    T_hat = torch.eye(D, dtype=torch.float64) + a.Q @ a.M @ a.Q.T
    assert (T_hat.T @ T_hat - torch.eye(D, dtype=torch.float64)).abs().max() <= 1e-12
    assert a.orth_error <= 1e-12 and a.rank == rank and a.Q.shape == (D, rank) and a.M.shape == (rank, rank)


def test_full_rank_is_exact_and_zero_rank_is_identity():
    T = _near_identity_rotation(1)
    eye = torch.eye(D, dtype=torch.float64)
    full = approximate(T, ApproxSpec(rank="full"))
    assert (eye + full.Q @ full.M @ full.Q.T - T).abs().max() <= 1e-12
    assert full.rel_error <= 1e-12 and full.energy == pytest.approx(1.0)
    zero = approximate(T, ApproxSpec(rank=0))
    assert zero.Q.shape == (D, 0) and zero.rel_error == pytest.approx(1.0) and zero.energy == 0.0


def test_error_falls_and_energy_rises_with_rank():
    T = _near_identity_rotation(2)
    results = [approximate(T, ApproxSpec(rank=r)) for r in (0, 2, 6, 12, 24, D)]
    errors, energies = [a.rel_error for a in results], [a.energy for a in results]
    assert errors == sorted(errors, reverse=True) and energies == sorted(energies)
    assert results[3].energy > 0.95  # 6 planes = 12 large singular values carry nearly all energy


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_adaptive_rank_is_the_smallest_reaching_the_energy(energy):
    T = _near_identity_rotation(3)
    sigma = torch.linalg.svdvals(T - torch.eye(D, dtype=torch.float64))
    r = adaptive_rank(sigma, energy)
    share = lambda k: (sigma[:k] ** 2).sum() / (sigma**2).sum()  # noqa: E731
    assert share(r) >= energy - 1e-12 and (r == 0 or share(r - 1) < energy)
    assert approximate(T, ApproxSpec(rank="adaptive", energy=energy)).rank == r


def test_identity_transition_needs_rank_zero():
    a = approximate(torch.eye(D, dtype=torch.float64), ApproxSpec(rank="adaptive", energy=0.9))
    assert a.rank == 0 and a.rel_error == 0.0


def test_float32_storage_restored_to_float64_orthogonality():
    a = approximate(_near_identity_rotation(4), ApproxSpec(rank=12))
    Q, M = restore_float64(a.Q.float(), a.M.float())
    T_hat = torch.eye(D, dtype=torch.float64) + Q @ M @ Q.T
    assert (T_hat.T @ T_hat - torch.eye(D, dtype=torch.float64)).abs().max() <= 1e-12
    assert (Q - a.Q).abs().max() <= 1e-6  # the same subspace, only re-orthonormalised


def test_online_module_equals_dense_matmul():
    T = _near_identity_rotation(5)
    a = approximate(T, ApproxSpec(rank=7))
    module = LowRankTransitions({"attn.0": a.Q}, {"attn.0": a.M})
    h = torch.randn(3, 5, D, dtype=torch.float64)
    dense = h @ (a.Q @ a.M @ a.Q.T)
    assert torch.allclose(module("attn.0", h), dense, rtol=0, atol=1e-12)
    assert module.ranks() == {"attn_0": 7}


@pytest.mark.parametrize("bad,match", [(-1, "must be an integer >= 0"), ("half", "give an integer >= 0"),
                                       (2.5, "must be an integer"), (True, "must be an integer")])
def test_bad_rank_values(bad, match):
    with pytest.raises(PipelineError, match=match):
        ApproxSpec(rank=bad)


def test_rank_above_hidden_size():
    with pytest.raises(PipelineError, match=f"approx.rank={D + 1} exceeds the hidden size {D}"):
        approximate(_near_identity_rotation(0), ApproxSpec(rank=D + 1))


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5])
def test_bad_energy(energy):
    with pytest.raises(PipelineError, match="approx.energy"):
        ApproxSpec(rank="adaptive", energy=energy)


# --- inside a fused model: float64, quantization off ---

PAPER = MethodSpec(name="respinquant", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True,
                   per_layer=True, transition="low_rank", chained=False)


def _original(name, tokens):
    reference = f64_model(name)
    replace_norms(reference, adapter_for(reference))
    return model_logits(reference, tokens)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", [RESPIN, PAPER], ids=["chained", "paper"])
def test_full_rank_reproduces_exact_layerwise_float64(name, method, tokens):
    rotations = random_per_layer_set(f64_model(name), seed=7)
    exact = model_logits(prepare_model(f64_model(name), LAYERWISE, rotations, QuantSpec()), tokens)
    model = f64_model(name)
    prepare_model(model, method, rotations, QuantSpec(), low_rank_subspace(model, rotations, "full", method.chained))
    assert max_rel_error(model_logits(model, tokens), exact) <= 1e-9


def test_paper_variant_function_error_is_measured_float64(tokens, capsys):
    """The paper's variant fuses the trained bases and puts T̂ in place of T: quantization off, its
    function error at r < D is that of the dropped part of ΔT. Measured (printed), not asserted to be
    zero; it must shrink to float64 rounding at r = D, and at r = 0 be the uncorrected basis mismatch
    (the trained bases fused with identity transitions)."""
    rotations = random_per_layer_set(f64_model("tiny_llama"), seed=7)
    original = _original("tiny_llama", tokens)
    errors = {}
    for rank in (0, 8, 32, 96, "full"):
        model = f64_model("tiny_llama")
        prepare_model(model, PAPER, rotations, QuantSpec(), low_rank_subspace(model, rotations, rank, chained=False))
        errors[rank] = max_rel_error(model_logits(model, tokens), original)
    with capsys.disabled():
        print("\npaper-variant max relative logit error (tiny_llama, random per-layer set, float64):",
              ", ".join(f"r={r}: {e:.2e}" for r, e in errors.items()))
    assert errors["full"] <= 1e-9
    assert errors[0] > 1e-3 and errors[96] > 1e-9  # a real perturbation below full rank
    assert errors[96] < errors[0]


def test_paper_and_chained_subspaces_differ():
    """Beyond the first add the paper's variant approximates the trained transition, the chained one
    the gap left by the chain: different Q, M (and a fuse refuses the other variant's artifact)."""
    from pipeline.rotation.subspace import check_subspace_variant

    model = f64_model("tiny_llama")
    rotations = random_per_layer_set(model, seed=7)
    chained, paper = low_rank_subspace(model, rotations, 8, True), low_rank_subspace(model, rotations, 8, False)
    assert torch.equal(chained["Q.attn.0"], paper["Q.attn.0"])  # both start from A_0
    assert (chained["M.ffn.1"] - paper["M.ffn.1"]).abs().max() > 1e-3
    check_subspace_variant({"chained": "false"}, False, "s.safetensors")
    check_subspace_variant({}, True, "old.safetensors")  # made before the mark: chained
    with pytest.raises(PipelineError, match="holds the chained variant's subspace, this method fuses the paper"):
        check_subspace_variant({"chained": "true"}, False, "s.safetensors")
    with pytest.raises(PipelineError, match="holds the paper variant's subspace"):
        check_subspace_variant({"chained": "false"}, True, "s.safetensors")


@pytest.mark.parametrize("name", MODELS)
def test_zero_rank_reproduces_identity_transitions_float64(name, tokens):
    """r = 0: every transition is I, so every basis is A_0: the global model with R1 = A_0, exactly."""
    rotations = random_per_layer_set(f64_model(name), seed=7)
    global_set = {"R1": rotations["A.0"], **{k: v for k, v in rotations.items() if k.startswith("R2.")}}
    method = MethodSpec(name="global", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True)
    identity = prepare_model(f64_model(name), method, global_set, QuantSpec())
    model = f64_model(name)
    prepare_model(model, RESPIN, rotations, QuantSpec(), low_rank_subspace(model, rotations, 0))
    assert max_rel_error(model_logits(model, tokens), model_logits(identity, tokens)) <= 1e-9
    for buf in model.rsq_transitions.buffers():
        assert buf.numel() == 0
    ref = prepare_model(f64_model(name), method, global_set, QuantSpec(w_bits=4, a_bits=4, kv_bits=4))
    quantized = f64_model(name)
    prepare_model(quantized, RESPIN, rotations, QuantSpec(w_bits=4, a_bits=4, kv_bits=4), low_rank_subspace(model, rotations, 0))
    assert max_rel_error(model_logits(quantized, tokens), model_logits(ref, tokens)) <= 1e-9  # same weights, same grid


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rank", [1, 16, "adaptive"])
def test_every_rank_preserves_the_function_float64(name, rank, tokens):
    """The weights are fused in the bases chained from the approximations: quantization off, the model
    is the original one at any rank (only the quantization grid differs between ranks)."""
    model = f64_model(name)
    rotations = random_per_layer_set(model, seed=7)
    prepare_model(model, RESPIN, rotations, QuantSpec(), low_rank_subspace(model, rotations, rank))
    assert max_rel_error(model_logits(model, tokens), _original(name, tokens)) <= 1e-9


def test_intermediate_rank_fuses_other_weights(tokens):
    """Guards the tests above: a partial rank fuses weights unlike both r = 0 and exact layer-wise."""
    rotations = random_per_layer_set(f64_model("tiny_llama"), seed=7)
    weights = {}
    for rank in (0, 16, "full"):
        model = f64_model("tiny_llama")
        prepare_model(model, RESPIN, rotations, QuantSpec(), low_rank_subspace(model, rotations, rank))
        weights[rank] = model.model.layers[1].mlp.down_proj.linear.weight
    assert (weights[16] - weights[0]).abs().max() > 1e-3 and (weights[16] - weights["full"]).abs().max() > 1e-3


def test_chain_tracks_the_trained_bases():
    """Each step approximates the gap to the trained basis, so errors do not pile up along layers."""
    model = f64_model("tiny_llama")
    rotations = random_per_layer_set(model, seed=7)
    bases = {k: orthonormalize(v) for k, v in rotations.items() if not k.startswith("R2.")}
    errors = {r: [row["basis_error"] for row in approximate_set(bases, 2, ApproxSpec(rank=r), progress=False)[1]]
              for r in (0, 32, 96, "full")}
    assert max(errors["full"]) <= 1e-12
    assert all(e96 < e32 < e0 for e0, e32, e96 in zip(errors[0], errors[32], errors[96]))


def test_subspace_for_another_model_refused():
    small, _ = load_model(model_cfg("tiny_llama"))
    other, _ = load_model(model_cfg("tiny_qwen2"))
    rotations = random_per_layer_set(other.double(), seed=1)
    sub = low_rank_subspace(other, rotations, 4)
    if other.config.num_hidden_layers == small.config.num_hidden_layers:
        with pytest.raises(PipelineError, match="do not fit hidden size"):
            check_subspace(sub, small)
    sub.pop("Q.ffn.1")
    with pytest.raises(PipelineError, match="lacks Q.ffn.1"):
        check_subspace(sub, other)


def test_low_rank_method_needs_a_subspace():
    model, _ = load_model(model_cfg("tiny_llama"))
    rotations = random_per_layer_set(f64_model("tiny_llama"), seed=1)
    with pytest.raises(PipelineError, match="run the approximate stage first"):
        prepare_model(model, RESPIN, rotations, QuantSpec())
    with pytest.raises(PipelineError, match="transition=low_rank needs per_layer=true"):
        MethodSpec(name="x", r1="hadamard", transition="low_rank")
    with pytest.raises(PipelineError, match="chained=true needs transition=low_rank"):
        MethodSpec(name="x", r1="hadamard", per_layer=True, chained=True)


def test_polar_falls_back_when_the_svd_fails(monkeypatch):
    """LAPACK's SVD can fail (or lose accuracy) on repeated singular values; the eigensolver route
    must give the same orthogonal factor."""
    from pipeline.rotation import subspace

    a = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = subspace.polar(a)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    got = subspace.polar(a)
    assert (got - expected).abs().max() <= 1e-12
    assert (got.T @ got - torch.eye(30, dtype=torch.float64)).abs().max() <= 1e-12


def test_singular_pairs_of_a_rotation_delta():
    from pipeline.rotation.subspace import singular_pairs

    T = _near_identity_rotation(6)
    delta = T - torch.eye(D, dtype=torch.float64)
    U, sigma = singular_pairs(delta)
    assert torch.allclose(sigma, torch.linalg.svdvals(delta), atol=1e-10)
    assert (U.T @ U - torch.eye(D, dtype=torch.float64)).abs().max() <= 1e-12
    assert torch.allclose(U.T @ delta @ delta.T @ U, torch.diag(sigma**2), atol=1e-12)
