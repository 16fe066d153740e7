"""Cayley SGD on the Stiefel manifold (Li, Li & Todorovic, ICLR 2020; the SpinQuant optimizer).

Each parameter is a matrix ``X`` of shape ``(n, p)``, ``p <= n``, with orthonormal columns
(``X.T @ X = I``); our rotations are square ``(D, D)``. A step:

    M <- momentum * M - grad                       (Euclidean momentum)
    W <- skew(M X^T - 1/2 X (X^T M X^T))           (Riemannian direction, skew-symmetric (n, n))
    M <- W X                                       (momentum kept on the tangent space)
    a <- min(lr, 2q / (||W|| + eps))               (keeps the fixed point below contracting)
    Y <- X + a M;  Y <- X + a/2 W (X + Y)  x iters (fixed-point Cayley retraction)

The Cayley transform of a skew matrix is orthogonal, so only the truncation of the fixed-point
iteration and float rounding leave the manifold. The step is computed in ``compute_dtype`` (float64 by
default: float32 matmul rounding alone drifts ~1e-6 per step) and the fixed point is iterated up to
``iters`` times or until it moves less than ``tol``; a QR re-orthogonalisation every
``reorth_every`` steps removes what drift is left. A zero gradient (and zero momentum) gives ``W = 0`` and leaves ``X``
unchanged. Works with any ``torch.optim.lr_scheduler``.

Memory (a per-layer Llama-3-8B set is 65 matrices of 4096 x 4096): only one matrix at a time is held in
``compute_dtype``; the persistent state is the step counter plus, for ``momentum > 0`` only, the
buffer ``M`` in the parameter's dtype (float32). With ``momentum == 0`` no buffer is kept at all.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


def orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """The nearest-in-spirit orthonormal-column matrix: Q of ``X = QR`` with ``diag(R) > 0``."""
    Q, R = torch.linalg.qr(X.to(torch.float64))
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(torch.float64)
    return (Q * sign).to(X.dtype)


class CayleySGD(Optimizer):
    """SGD with momentum for matrices with orthonormal columns (rotations).

    Args:
        params: tensors of shape ``(n, p)``, ``p <= n``, each with orthonormal columns.
        lr: step size (paper's SpinQuant setting: 1.5 with a linearly decaying schedule).
        momentum: heavy-ball coefficient (0 = plain Riemannian gradient descent).
        iters: maximum fixed-point iterations of the Cayley retraction.
        tol: stop iterating once an iteration moves ``Y`` by less than this (max abs).
        q: bound on the step relative to ``||W||`` (2q / ||W|| with q < 1 makes the iteration contract).
        reorth_every: QR re-orthogonalisation period in steps (0 = never).
    """

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0, iters: int = 8, q: float = 0.5,
                 eps: float = 1e-8, reorth_every: int = 50, tol: float = 1e-12,
                 compute_dtype: torch.dtype = torch.float64) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or iters < 1 or not 0 < q < 1:
            raise ValueError(f"bad CayleySGD settings: lr={lr}, momentum={momentum}, iters={iters}, q={q}")
        super().__init__(params, dict(lr=lr, momentum=momentum, iters=iters, q=q, eps=eps,
                                      reorth_every=reorth_every, tol=tol, compute_dtype=compute_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for X in group["params"]:
                if X.grad is None:
                    continue
                if X.ndim != 2 or X.shape[1] > X.shape[0]:
                    raise ValueError(f"CayleySGD needs (n, p) parameters with p <= n, got {tuple(X.shape)}")
                state = self.state[X]
                X0 = X.detach().to(group["compute_dtype"])
                grad = X.grad.to(group["compute_dtype"])
                beta = group["momentum"]
                if beta == 0:  # plain Riemannian descent: no buffer kept (it would be D x D per rotation)
                    state.pop("momentum", None)
                    M = -grad
                else:
                    M = state.get("momentum")
                    M = -grad if M is None else beta * M.to(group["compute_dtype"]) - grad
                del grad
                W_hat = M @ X0.T - 0.5 * X0 @ ((X0.T @ M) @ X0.T)
                W = W_hat - W_hat.T
                del W_hat
                M = W @ X0  # the tangent direction, in compute_dtype for this step only
                if beta != 0:
                    state["momentum"] = M.to(X.dtype)  # persistent buffer in the parameter's dtype
                state["step"] = state.get("step", 0) + 1
                if not torch.any(W):
                    continue  # no direction: X stays exactly as it is (no retraction, no QR)
                alpha = min(group["lr"], 2 * group["q"] / (W.norm().item() + group["eps"]))
                Y = X0 + alpha * M
                for _ in range(group["iters"]):
                    Y_next = X0 + (alpha / 2) * W @ (X0 + Y)
                    moved = (Y_next - Y).abs().max().item()
                    Y = Y_next
                    if moved < group["tol"]:
                        break
                if group["reorth_every"] and state["step"] % group["reorth_every"] == 0:
                    Y = orthonormalize(Y)
                X.copy_(Y.to(X.dtype))
        return loss
