"""Mixture-of-experts blocks as one linear per expert (Qwen3-MoE, OLMoE, Mixtral).

transformers 5.x keeps a sparse block's experts fused: ``mlp.experts.gate_up_proj`` ``(E, 2I, D)``
(each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` ``(E, D, I)``, multiplied
by a grouped matmul; the router ``mlp.gate`` is a plain ``(E, D)`` weight (no bias) whose softmax and
top-k pick each token's experts. Rotations, GPTQ, activation quantization and the W4A4 kernels work
on one ``nn.Linear`` at a time, so ``split_experts`` replaces every fused experts module by
``ExpertLinears``: E ``ExpertMLP`` (``experts.<e>.{gate,up,down}_proj``, Llama's MLP layout),
called with the router's choice exactly as HF calls its experts. Same weights, same routing, the
same sums per token (``tests/test_moe.py``: float64 against HF's own forward).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..infra.errors import PipelineError


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``, ``x (T, D)`` -> ``(T, D)``."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        (inter, hidden), dtype = gate.shape, gate.dtype
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=gate.device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=gate.device, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=gate.device, dtype=dtype)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate)
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """The experts of a sparse block as a list of ``ExpertMLP`` (so expert e's linears are
    ``mlp.experts.<e>.{gate,up,down}_proj``: the per-expert names of the Qwen3-MoE and OLMoE hub
    checkpoints); ``forward(x (T, D), top_k_index (T, k), top_k_weights (T, k))`` -> ``(T, D)``: each
    token's chosen experts' outputs, weighted by the router and summed, as HF's experts module computes
    them (one expert at a time, its tokens gathered)."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "ExpertLinears":
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        n, two_i, _ = gate_up.shape
        if two_i % 2 or down.shape[0] != n or down.shape[2] != two_i // 2:
            raise PipelineError(f"{type(fused).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                                f"{tuple(down.shape)} are not (E, 2I, D) and (E, D, I)")
        inter = two_i // 2
        return cls([ExpertMLP(gate_up[e, :inter], gate_up[e, inter:], down[e], fused.act_fn) for e in range(n)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # (slot, token) pairs in HF's order; a token picks an expert at most once
            pos, token = torch.where(top_k_index.T == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5.x fused experts module (3-D ``gate_up_proj`` and ``down_proj``)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn"))


def split_experts(model: nn.Module) -> int:
    """Replace, in place, every fused experts module of ``model`` by its ``ExpertLinears``; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertLinears.from_fused(module))
    return len(targets)


def sparse_blocks(layer: nn.Module) -> list[nn.Module]:
    """The decoder layer's sparse MoE blocks (a ``gate`` router and ``experts``); empty for a dense layer."""
    return [m for m in layer.modules() if hasattr(m, "gate") and hasattr(m, "experts")
            and (is_fused_experts(m.experts) or isinstance(m.experts, ExpertLinears))]


_EXPERT_KEY = re.compile(r"^(?P<pre>.*)\.mlp\.experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_ROUTER_KEY = re.compile(r"^(?P<pre>.*)\.mlp\.gate\.weight$")
_MIXTRAL = {"gate": "w1", "up": "w3", "down": "w2"}


def read_expert_weight(key: str, available: set[str], get) -> torch.Tensor | None:
    """The tensor for the split-expert (or router) name ``key`` from a weight source that stores it under
    another name, or None: Mixtral's hub names (``block_sparse_moe.experts.<e>.w1/w3/w2``, router
    ``block_sparse_moe.gate``) and transformers 5's fused layout (``mlp.experts.gate_up_proj`` (E, 2I, D),
    gate rows first; ``mlp.experts.down_proj`` (E, D, I)). ``get(name)`` reads one tensor."""
    router = _ROUTER_KEY.match(key)
    if router:
        alt = f"{router['pre']}.block_sparse_moe.gate.weight"
        return get(alt) if alt in available else None
    m = _EXPERT_KEY.match(key)
    if not m:
        return None
    pre, e, proj = m["pre"], int(m["e"]), m["proj"]
    alt = f"{pre}.block_sparse_moe.experts.{e}.{_MIXTRAL[proj]}.weight"
    if alt in available:
        return get(alt)
    fused = f"{pre}.mlp.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
    if fused not in available:
        return None
    w = get(fused)[e]
    if proj == "down":
        return w
    half = w.shape[0] // 2
    return w[:half] if proj == "gate" else w[half:]
