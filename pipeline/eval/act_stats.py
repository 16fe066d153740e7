"""Per-linear-input activation statistics: how outlier-heavy what each quantizer sees is.

For every decoder linear input ``X`` (tokens x channels, pooled over the calibration windows; for a
wrapped linear, after its online Hadamard and before activation quant):
- ``absmax``: max |X|;
- ``kurtosis``: kurtosis of all entries of X (3 for a Gaussian; large means heavy tails);
- ``max_median_ratio``: max over channels of channel absmax / median channel absmax.
Rotations should flatten all three.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..model.adapters import adapter_for
from ..model.streaming import layer_by_layer, layer_inputs, run_layer
from ..surgery.online import QuantLinear
from ..rotation.hadamard import online_hadamard


class _Accumulator:
    """Streaming sums for one linear input."""

    def __init__(self) -> None:
        self.n = 0
        self.s1 = self.s2 = self.s3 = self.s4 = 0.0
        self.chan_absmax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.numel()
        self.s1 += x.sum().item()
        self.s2 += x.pow(2).sum().item()
        self.s3 += x.pow(3).sum().item()
        self.s4 += x.pow(4).sum().item()
        amax = x.abs().amax(dim=0)
        self.chan_absmax = amax if self.chan_absmax is None else torch.maximum(self.chan_absmax, amax)

    def result(self) -> dict[str, float]:
        n, mu = self.n, self.s1 / self.n
        var = self.s2 / n - mu**2
        m4 = self.s4 / n - 4 * mu * self.s3 / n + 6 * mu**2 * self.s2 / n - 3 * mu**4
        kurt = m4 / max(var, 1e-30) ** 2
        amax = self.chan_absmax
        return {
            "absmax": amax.max().item(),
            "kurtosis": kurt,
            "max_median_ratio": (amax.max() / amax.median().clamp(min=1e-12)).item(),
        }


def _linear_label(name: str) -> str:
    """A linear's CSV label: its own name (``q_proj``), or ``experts.<e>.gate_proj`` for a MoE expert."""
    return name.split("mlp.", 1)[-1] if ".experts." in name else name.split(".")[-1]


class ActivationStats:
    """Accumulators of every watched decoder linear input, in watch order (layer by layer)."""

    def __init__(self) -> None:
        self.accs: dict[tuple[int, str], _Accumulator] = {}

    def watch(self, layer: nn.Module, i: int, adapter) -> list:
        """Hook decoder layer ``i``'s linear inputs; returns the hook handles (remove them when done)."""
        handles = []
        for name in adapter.layer_linear_names(layer):
            acc = self.accs.setdefault((i, name), _Accumulator())

            def hook(mod, args, acc=acc):
                x = args[0]
                if isinstance(mod, QuantLinear) and mod.rotate_input:
                    x = online_hadamard(x)
                acc.add(x)

            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
        return handles

    def rows(self) -> list[dict]:
        """One row per linear that saw input (a MoE expert no token reached has none): ``{"layer", "linear",
        "index", "absmax", "kurtosis", "max_median_ratio"}``."""
        return [{"layer": i, "linear": _linear_label(name), "index": index, **acc.result()}
                for index, ((i, name), acc) in enumerate(self.accs.items()) if acc.n > 0]


@torch.no_grad()
def activation_stats(model: nn.Module, windows: torch.Tensor) -> list[dict]:
    """One row per decoder linear: ``{"layer", "linear", "index", "absmax", "kurtosis", "max_median_ratio"}``.

    ``windows``: ``(n, seqlen)`` token ids, run one per forward on the model's device.
    """
    adapter = adapter_for(model)
    stats = ActivationStats()
    handles = [h for i, layer in enumerate(adapter.layers(model)) for h in stats.watch(layer, i, adapter)]
    device = next(model.get_input_embeddings().parameters()).device
    try:
        for window in tqdm(windows, desc="activation stats", unit="win"):
            model(window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats.rows()


@torch.no_grad()
def activation_stats_streamed(model: nn.Module, layers, windows: torch.Tensor) -> list[dict]:
    """``activation_stats`` layer-sequentially: ``layers`` loads and frees each decoder layer of
    ``model`` (``streaming.SourceLayers`` or ``checkpoint.CheckpointReader``); every window's hidden
    states pass layer i with its linear inputs watched, then layer i is freed. Same rows as the
    whole-model pass; memory is one layer plus the windows' hidden states."""
    adapter = adapter_for(model)
    stats = ActivationStats()
    hidden, kwargs = layer_inputs(model, adapter.layers(model)[0], windows)
    for i, layer in layer_by_layer(model, layers, "activation stats (layer-sequential)"):
        handles = stats.watch(layer, i, adapter)
        try:
            hidden = run_layer(layer, hidden, kwargs)
        finally:
            for h in handles:
                h.remove()
    return stats.rows()


def summarize_stats(rows: list[dict]) -> dict[str, float]:
    """Model-level summary of ``activation_stats`` rows (what MLflow and the metrics files get)."""
    t = {k: torch.tensor([r[k] for r in rows]) for k in ("absmax", "kurtosis", "max_median_ratio")}
    return {
        "act_absmax_max": t["absmax"].max().item(),
        "act_kurtosis_mean": t["kurtosis"].mean().item(),
        "act_max_median_ratio_mean": t["max_median_ratio"].mean().item(),
    }
