"""Methods as data: which rotations a method makes, and how a model is transformed for it.

Every method goes through the same machinery (DESIGN §1 table):
- ``make_rotations``: the method's rotation set (``R1``: (D, D); ``R2.<i>``: (head_dim, head_dim)).
- ``prepare_model``: fold norms, fuse R1/R2/R4 into the weights, fake-quantize weights, attach the
  online ops (R3, R4, activation and KV quant). Quantization off + any rotations = the original model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from .adapters import DecoderAdapter, adapter_for, get_linear, set_module
from .errors import PipelineError
from .hadamard import orthogonal_hadamard
from .online import OnlineAttention, QuantLinear, use_online_attention
from .quantizers import OFF_BITS, ActQuantizer, QuantSpec, quantize_weight_rtn
from .surgery import apply_r1, apply_r2, fold_norms, fuse_r4, replace_norms, untie_embeddings

ROTATION_KINDS = ("none", "hadamard", "random_hadamard")


@dataclass(frozen=True)
class MethodSpec:
    """What a method does to the model (see ``conf/method/*.yaml``)."""

    name: str
    r1: str = "none"  # none | hadamard | random_hadamard
    r2: str = "none"
    online_r3: bool = False
    online_r4: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PipelineError(f"method.name={self.name!r}: must be a non-empty string")
        if not isinstance(self.seed, int):
            raise PipelineError(f"method.seed={self.seed!r}: must be an integer")
        for site in ("r1", "r2"):
            kind = getattr(self, site)
            if kind not in ROTATION_KINDS:
                raise PipelineError(f"method.{site}={kind}: choose one of {', '.join(ROTATION_KINDS)}")

    @property
    def rotates(self) -> bool:
        return self.r1 != "none" or self.r2 != "none" or self.online_r3 or self.online_r4

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict) -> "MethodSpec":
        known = {k: cfg[k] for k in ("name", "r1", "r2", "online_r3", "online_r4", "seed") if k in cfg}
        if "name" not in known:
            raise PipelineError("method config has no name")
        return cls(**known)


def quant_spec(cfg: DictConfig | dict) -> QuantSpec:
    """``QuantSpec`` from a ``quant`` config node; bad values become one-line PipelineErrors."""
    fields = ("w_bits", "a_bits", "kv_bits", "a_clip_ratio", "kv_clip_ratio", "w_mse_clip")
    try:
        return QuantSpec(**{k: cfg[k] for k in fields if k in cfg})
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc)) from None


def _rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return orthogonal_hadamard(n)
    return orthogonal_hadamard(n, seed=seed)


def make_rotations(method: MethodSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's untrained rotations, float64: ``R1`` (D, D) and ``R2.<layer>`` (hd, hd)."""
    adapter = adapter_for(model)
    dims = adapter.dims(model)
    rotations: dict[str, torch.Tensor] = {}
    if method.r1 != "none":
        rotations["R1"] = _rotation(method.r1, dims.hidden, method.seed)
    if method.r2 != "none":
        for i in range(dims.n_layers):
            rotations[f"R2.{i}"] = _rotation(method.r2, dims.head_dim, method.seed + 1 + i)
    return rotations


def _check_rotations(rotations: dict[str, torch.Tensor], method: MethodSpec, adapter: DecoderAdapter,
                     model: nn.Module) -> None:
    dims = adapter.dims(model)
    if (method.r1 != "none") != ("R1" in rotations):
        raise PipelineError(f"method {method.name}: rotation set {'lacks' if method.r1 != 'none' else 'has'} R1")
    if "R1" in rotations and tuple(rotations["R1"].shape) != (dims.hidden, dims.hidden):
        raise PipelineError(f"R1 has shape {tuple(rotations['R1'].shape)}, model hidden size is {dims.hidden}")
    r2 = {k: v for k, v in rotations.items() if k.startswith("R2.")}
    expected = dims.n_layers if method.r2 != "none" else 0
    if len(r2) != expected:
        raise PipelineError(f"method {method.name}: rotation set has {len(r2)} R2 matrices, expected {expected}")
    for key, R in r2.items():
        if tuple(R.shape) != (dims.head_dim, dims.head_dim):
            raise PipelineError(f"{key} has shape {tuple(R.shape)}, model head_dim is {dims.head_dim}")


def prepare_model(
    model: nn.Module, method: MethodSpec, rotations: dict[str, torch.Tensor], quant: QuantSpec
) -> nn.Module:
    """Transform ``model`` in place for ``method`` at ``quant`` and return it.

    Order: untie -> fold norms (if the method rotates) -> R1 -> R2 -> R4 fused -> weight RTN ->
    wrappers with online Hadamard / activation quant -> R3 + KV quant in attention.
    """
    adapter = adapter_for(model)
    _check_rotations(rotations, method, adapter, model)
    untie_embeddings(model, adapter)  # every method: one checkpoint layout for all
    if method.rotates:
        fold_norms(model, adapter)
    else:
        replace_norms(model, adapter)
    if "R1" in rotations:
        apply_r1(model, adapter, rotations["R1"])
    for i, layer in enumerate(adapter.layers(model)):
        if f"R2.{i}" in rotations:
            apply_r2(layer, adapter, rotations[f"R2.{i}"])
        if method.online_r4:
            fuse_r4(layer, adapter)
    quantize_linear_weights(model, adapter, quant)
    attach_online_ops(model, adapter, method, quant)
    return model


@torch.no_grad()
def quantize_linear_weights(model: nn.Module, adapter: DecoderAdapter, quant: QuantSpec) -> None:
    """RTN (per-output-channel symmetric, MSE clip) on every decoder linear; embedding/lm_head stay."""
    if quant.w_bits >= OFF_BITS:
        return
    for layer in adapter.layers(model):
        for name in adapter.layer_linear_names():
            linear = get_linear(layer, name)
            w = linear.weight.to(torch.float32) if linear.weight.dtype != torch.float64 else linear.weight
            linear.weight.copy_(quantize_weight_rtn(w, quant.w_bits, quant.w_mse_clip).to(linear.weight.dtype))


def attach_online_ops(model: nn.Module, adapter: DecoderAdapter, method: MethodSpec, quant: QuantSpec) -> None:
    """Wrap every decoder linear in ``QuantLinear`` and give attention its R3/KV ops."""
    use_online_attention(model)
    for layer in adapter.layers(model):
        for name in adapter.layer_linear_names():
            act = ActQuantizer(quant.a_bits, quant.a_clip_ratio) if quant.a_bits < OFF_BITS else None
            online = method.online_r4 and name == adapter.MLP_WRITER
            set_module(layer, name, QuantLinear(get_linear(layer, name), act, online))
        adapter.attention(layer).rsq_online = OnlineAttention(
            method.online_r3, quant.kv_bits, quant.kv_clip_ratio
        )
