"""The premise diagnostic (pipeline/tools/premise.py): directions, spectra, split-half, cells on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import model_cfg

from pipeline.tools import premise
from pipeline.rotation.cayley import CayleySGD, orthonormalize
from pipeline.methods import MethodSpec, quant_spec
from pipeline.model.load import load_model


@pytest.fixture(autouse=True)
def one_thread():
    """Small LAPACK calls on a busy shared CPU take seconds with several threads, milliseconds with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return orthonormalize(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_cayley_direction_is_the_optimizers_first_step():
    X0, G = _orthogonal(12, 0), torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = premise.cayley_direction(G, X0)
    assert torch.allclose(W, -W.T)
    X = torch.nn.Parameter(X0.clone())
    X.grad = G.clone()
    lr = 1e-6
    CayleySGD([X], lr=lr, iters=20, reorth_every=0).step()
    assert torch.allclose((X.detach() - X0) / lr, W @ X0, rtol=1e-4, atol=1e-6)


def test_transition_directions_skew_at_the_start_and_the_step_variant():
    D, L = 16, 2
    R = _orthogonal(D, 2)
    bases = {f"A.{i}": R for i in range(L + 1)} | {f"B.{i}": R for i in range(L)}
    gen = torch.Generator().manual_seed(3)
    grads = {k: torch.randn(D, D, generator=gen, dtype=torch.float64) for k in bases}
    W_all = premise.basis_directions(grads, bases)
    deltas = premise.transition_directions(W_all, bases, L)
    assert list(deltas) == ["attn.0", "ffn.0", "attn.1", "ffn.1"]
    for d in deltas.values():
        assert d.shape == (D, D) and torch.allclose(d, -d.T, atol=1e-12)
    W = {k: premise.cayley_direction(grads[k], R) for k in ("A.1", "B.1")}
    assert torch.allclose(deltas["attn.1"], R.T @ (W["B.1"] - W["A.1"]) @ R)
    step = premise.transition_directions(W_all, bases, L, lr=1.5)["attn.1"]
    a = {k: min(1.5, 1.0 / (w.norm().item() + 1e-8)) for k, w in W.items()}
    assert torch.allclose(step, R.T @ (a["B.1"] * W["B.1"] - a["A.1"] * W["A.1"]) @ R)


def test_energy_and_agreement():
    D, r = 24, 4
    G = torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    S = G - G.T
    energies = [premise.captured_energy(S, k) for k in range(D + 1)]
    assert all(0.0 <= e <= 1.0 for e in energies) and energies == sorted(energies)
    assert energies[D] == pytest.approx(1.0) and premise.captured_energy(S, 100) == pytest.approx(1.0)
    assert energies[2] == pytest.approx(2 * energies[1])  # a skew matrix's singular values come in pairs
    low = torch.zeros(D, D, dtype=torch.float64)
    low[0, 1], low[1, 0] = 1.0, -1.0
    assert premise.captured_energy(low, 2) == pytest.approx(1.0)
    assert premise.captured_energy(torch.zeros(D, D), r) == 1.0
    assert premise.subspace_agreement(S, S, r) == pytest.approx(1.0)
    other = torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert 0.0 <= premise.subspace_agreement(S, other - other.T, r) < 1.0
    assert premise.top_subspace(S, r).shape == (D, r)
    assert premise.signal_share(S, S, S) == pytest.approx(1.0)
    assert abs(premise.signal_share(S, other - other.T, (S + other - other.T) / 2)) < 0.5
    profile = premise.split_half_profile(S, S, S, [1, 2, r, D, 2 * D])
    for k, row in profile.items():
        assert row["energy"] == pytest.approx(premise.captured_energy(S, k))
        assert row["heldout"] == pytest.approx(row["energy"]) and row["agreement"] == pytest.approx(1.0)
    O = other - other.T
    mixed = premise.split_half_profile((S + O) / 2, S, O, [r])[r]
    assert 0.0 <= mixed["heldout"] < premise.captured_energy(S, r) and mixed["agreement"] == pytest.approx(
        premise.subspace_agreement(S, O, r))
    q = premise.quantiles([0.0, 1.0, 2.0, 3.0, 4.0])
    assert (q["median"], q["q25"], q["q75"], q["min"], q["max"]) == (2.0, 1.0, 3.0, 0.0, 4.0)


def _tiny():
    return premise.compose("tiny_llama", "w4a4kv4", "enwiki", 0, "float32")


def test_gradients_on_a_tiny_model_and_identical_halves():
    cfg = _tiny()
    model, _ = load_model(model_cfg("tiny_llama"))
    rotations, L = premise.premise_model(model, MethodSpec.from_cfg(cfg.method), quant_spec(cfg.quant))
    D = model.config.hidden_size
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))
    grads, loss = premise.window_gradients(model, rotations, ids)
    assert sorted(grads) == sorted([f"A.{i}" for i in range(L + 1)] + [f"B.{i}" for i in range(L)])
    assert all(g.shape == (D, D) and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert loss > 0 and all(p.grad is None for p in rotations.mats)
    bases = {k: v.detach() for k, v in rotations.as_dict().items() if k in grads}
    sums = premise.GradientSums()
    sums.add(grads)
    sums.add(grads)  # the same window in both halves: the halves agree exactly
    metrics = premise.premise_metrics(sums, bases, L, rank=8)
    assert metrics["agreement"]["min"] == pytest.approx(1.0) and metrics["step_agreement"]["min"] == pytest.approx(1.0)
    assert len(metrics["energy_per_transition"]) == 2 * L
    assert all(0.0 <= e <= 1.0 for e in metrics["energy_per_transition"])
    assert metrics["skew_error"] < 1e-12
    assert metrics["signal_share"]["min"] == pytest.approx(1.0)
    assert metrics["heldout_energy_per_transition"] == pytest.approx(metrics["energy_per_transition"])
    assert metrics["by_rank"]["8"]["energy"] == metrics["energy"] and set(metrics["by_rank"]) >= {"2", "32", "128"}
    assert premise.premise_metrics(sums, bases, L, rank=D)["energy"]["min"] == pytest.approx(1.0)


def test_cells_skip_resume_and_deadline(tmp_path):
    cfg = _tiny()
    loads = []

    def load():
        loads.append(1)
        return load_model(model_cfg("tiny_llama"))

    def plan(counts, deadline=None):
        return premise.Plan(counts, tmp_path / "p.json", tmp_path / "scratch", deadline, rank=8, seqlen=16)

    assert len(premise.run_cells(plan([2]), cfg, load)) == 1
    state = next((tmp_path / "scratch").iterdir())
    digest = json.loads((tmp_path / "p.json").read_text())["results"].popitem()[1]["config_sha256"]
    assert premise.GradientSums.load(state, digest).n == 2
    # N=2 is skipped; N=4 resumes from the 2 summed windows
    written = premise.run_cells(plan([2, 4]), cfg, load)
    assert [k.split("/")[1] for k in written] == ["N4"] and len(loads) == 2
    sums = premise.GradientSums.load(state, digest)
    assert sums.n == 4 and len(sums.single) == 4
    results = json.loads((tmp_path / "p.json").read_text())["results"]
    assert sorted(r["windows"] for r in results.values()) == [2, 4]
    assert premise.run_cells(plan([2, 4]), cfg, load) == [] and len(loads) == 2  # nothing to do, nothing loaded
    # a cell whose estimate passes the deadline is not started
    assert premise.run_cells(plan([4, 64], deadline=1e-3), cfg, load) == [] and len(loads) == 2
    # sums already past N (another results file): the cell sums its own windows and leaves the state alone
    other = premise.Plan([2], tmp_path / "other.json", tmp_path / "scratch", None, rank=8, seqlen=16)
    premise.run_cells(other, cfg, load)
    again = json.loads((tmp_path / "other.json").read_text())["results"]
    first = json.loads((tmp_path / "p.json").read_text())["results"]
    key = next(iter(again))
    assert again[key]["energy_per_transition"] == pytest.approx(first[key]["energy_per_transition"])
    assert premise.GradientSums.load(state, digest).n == 4
    rows = premise.table(tmp_path / "p.json")
    assert len(rows) == 2 + 2 + 1 and rows[2].startswith("| tiny_llama | 0 |") and "| 2 |" in rows[2]
    pytest.importorskip("matplotlib")
    assert premise.plot(tmp_path / "p.json", tmp_path / "p.png").stat().st_size > 0


def test_window_sample_is_nested():
    """The running sums rely on it: the first N of a larger seeded sample are the N-window sample."""
    from pipeline.eval.data import sample_windows

    ids = torch.arange(5000)
    assert torch.equal(sample_windows(ids, 64, 32, 3)[:16], sample_windows(ids, 16, 32, 3))


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    for argv in (["--windows", "1"], ["--deadline", "0"], ["--model", "no_such_model", "--out", str(tmp_path / "p.json")]):
        with pytest.raises(SystemExit) as exit_:
            premise.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        premise.main(["--windows", "2", "--out", str(bad)])
    assert "not a premise results file" in capsys.readouterr().err
