"""Cayley SGD keeps rotations orthogonal, solves Procrustes, and does nothing on a zero gradient."""
from __future__ import annotations

import pytest
import torch

from pipeline.rotation.cayley import CayleySGD, orthonormalize
from pipeline.rotation.hadamard import orthogonal_hadamard


def _ortho_err(R: torch.Tensor) -> float:
    return (R.T @ R - torch.eye(R.shape[1], dtype=R.dtype)).abs().max().item()


def test_stays_orthogonal_over_500_float32_steps():
    torch.manual_seed(0)
    R = torch.nn.Parameter(orthogonal_hadamard(64, seed=1, dtype=torch.float32))
    opt = CayleySGD([R], lr=1.5, momentum=0.9, reorth_every=100)
    worst = 0.0
    for _ in range(500):
        opt.zero_grad()
        (R * torch.randn(64, 64)).sum().backward()  # a fresh random gradient every step
        opt.step()
        worst = max(worst, _ortho_err(R.detach()))
    assert worst <= 1e-5


def test_stays_orthogonal_without_reorthogonalisation():
    R = torch.nn.Parameter(orthogonal_hadamard(32, dtype=torch.float32))
    opt = CayleySGD([R], lr=0.5, momentum=0.5, reorth_every=0)
    for i in range(200):
        opt.zero_grad()
        (R * torch.randn(32, 32, generator=torch.Generator().manual_seed(i))).sum().backward()
        opt.step()
    assert _ortho_err(R.detach()) <= 1e-4  # fixed-point truncation only


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_solves_orthogonal_procrustes(momentum):
    """min_R ||A R - B||_F with B = A R_true: the optimum is R_true (A full rank)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(256, 16, generator=g, dtype=torch.float64)
    R_true = orthonormalize(torch.randn(16, 16, generator=g, dtype=torch.float64))
    if torch.det(R_true) < 0:  # the Cayley flow from I stays in SO(n): aim at a reachable optimum
        R_true[:, 0] *= -1
    B = A @ R_true
    R = torch.nn.Parameter(torch.eye(16, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.2, momentum=momentum)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=400)
    for _ in range(400):
        opt.zero_grad()
        ((A @ R - B).pow(2).sum() / A.shape[0]).backward()
        opt.step()
        sched.step()
    assert (R.detach() - R_true).abs().max() < 1e-6


def test_zero_gradient_leaves_rotation_unchanged():
    R0 = orthogonal_hadamard(16, seed=3, dtype=torch.float32)
    R = torch.nn.Parameter(R0.clone())
    opt = CayleySGD([R], lr=1.5, momentum=0.9, reorth_every=1)
    for _ in range(5):
        R.grad = torch.zeros_like(R)
        opt.step()
    assert torch.equal(R.detach(), R0)


def test_rejects_wide_matrices_and_bad_settings():
    with pytest.raises(ValueError, match="bad CayleySGD settings"):
        CayleySGD([torch.nn.Parameter(torch.eye(2))], lr=-1)
    X = torch.nn.Parameter(torch.zeros(2, 3))
    X.grad = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="p <= n"):
        CayleySGD([X]).step()


def _reference_step(X: torch.Tensor, grad: torch.Tensor, lr: float, q: float = 0.5, iters: int = 8,
                    tol: float = 1e-12, eps: float = 1e-8) -> torch.Tensor:
    """One momentum-0 step as the optimizer computed it when it still stored ``W @ X`` (float64)."""
    X0, M = X.to(torch.float64), -grad.to(torch.float64)
    W_hat = M @ X0.T - 0.5 * X0 @ ((X0.T @ M) @ X0.T)
    W = W_hat - W_hat.T
    alpha = min(lr, 2 * q / (W.norm().item() + eps))
    Y = X0 + alpha * (W @ X0)
    for _ in range(iters):
        Y_next = X0 + (alpha / 2) * W @ (X0 + Y)
        moved = (Y_next - Y).abs().max().item()
        Y = Y_next
        if moved < tol:
            break
    return Y.to(X.dtype)


def test_momentum_zero_keeps_no_buffer_and_steps_bit_identically():
    """Memory: a per-layer 8B set is 65 x 4096², so a float64 buffer per matrix would be ~17 GB."""
    R = torch.nn.Parameter(orthogonal_hadamard(32, seed=2, dtype=torch.float32))
    opt = CayleySGD([R], lr=1.5, momentum=0.0, reorth_every=0)
    for i in range(20):
        grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(i))
        expected = _reference_step(R.detach(), grad, lr=1.5)
        R.grad = grad.clone()
        opt.step()
        assert torch.equal(R.detach(), expected), i
    state = opt.state[R]
    assert set(state) == {"step"} and state["step"] == 20
    assert not any(torch.is_tensor(v) for v in state.values())


def test_momentum_buffer_is_kept_in_the_parameter_dtype():
    R = torch.nn.Parameter(orthogonal_hadamard(32, seed=2, dtype=torch.float32))
    opt = CayleySGD([R], lr=1.5, momentum=0.9)
    for i in range(3):
        R.grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(i))
        opt.step()
    state = opt.state[R]
    assert set(state) == {"momentum", "step"}
    assert state["momentum"].dtype == torch.float32 and state["momentum"].shape == R.shape
    assert state["momentum"].abs().sum() > 0
