"""Methods as data: which rotations a method makes, and how a model is transformed for it.

Every method goes through the same machinery (DESIGN §1 table):
- ``make_rotations``: the method's initial rotation set (see ``surgery.plan`` for the names);
- ``prepare_model``: fold norms, fuse the rotation set and R4 into the weights (float64), fake-quantize
  weights, attach the online ops (R3, R4, activation and KV quant, per-layer transitions).
  Quantization off + any rotation set = the original model, to float64 precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from .model.adapters import DecoderAdapter, adapter_for, get_linear, set_module
from .infra.artifacts import tensor_shape
from .infra.errors import PipelineError
from .rotation.hadamard import orthogonal_hadamard
from .rotation.subspace import transition_chain
from .surgery.online import OnlineAttention, QuantLinear, use_online_attention
from .quant.quantizers import OFF_BITS, ActQuantizer, QuantSpec
from .surgery.bases import FusionBases
from .surgery.plan import embedding_steps, head_steps, layer_steps, transform_tensor
from .surgery.weights import (F64_CHUNK_ELEMENTS, fold_final_norm, fold_layer_norms, fuse_r4, head_cols, in_float64, reader,
                      replace_final_norm, replace_layer_norms, untie_embeddings)
from .surgery.transitions import DenseTransitions, LowRankTransitions, attach_transition_module
from .quant.codes import dequantize, rtn
from .quant.gptq import gptq_model

ROTATION_KINDS = ("none", "hadamard", "random_hadamard")
TRANSITIONS = ("dense", "low_rank")


@dataclass(frozen=True)
class MethodSpec:
    """What a method does to the model (see ``conf/method/*.yaml``).

    ``r1``/``r2`` name the initial rotations (trained methods start from them); ``per_layer`` gives
    every layer its own bases A_i, B_i (all starting at R1) with transitions at the residual adds,
    applied exactly (``transition="dense"``, exact layer-wise) or as their rank-r subspace
    approximation (``"low_rank"``, ReSpinQuant; needs the approximate stage's subspace).

    ``chained`` (low-rank only) picks how the weights are fused: ``False`` is the paper's ReSpinQuant
    (the trained bases fused as trained, ``T̂`` in place of ``T`` online: a function error at r < D);
    ``True`` is this project's chained variant (weights fused in the bases chained from the ``T̂``:
    exact at every r, the approximation error moves into the quantization bases). DESIGN §1.
    """

    name: str
    r1: str = "none"  # none | hadamard | random_hadamard
    r2: str = "none"
    online_r3: bool = False
    online_r4: bool = False
    per_layer: bool = False
    train: bool = False  # trained rotations (SpinQuant protocol); else the initial ones are final
    seed: int = 0
    transition: str = "dense"  # per-layer only: dense | low_rank
    chained: bool = False  # low_rank only: fuse in the bases chained from the approximations

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PipelineError(f"method.name={self.name!r}: must be a non-empty string")
        if not isinstance(self.seed, int):
            raise PipelineError(f"method.seed={self.seed!r}: must be an integer")
        for site in ("r1", "r2"):
            kind = getattr(self, site)
            if kind not in ROTATION_KINDS:
                raise PipelineError(f"method.{site}={kind}: choose one of {', '.join(ROTATION_KINDS)}")
        if self.transition not in TRANSITIONS:
            raise PipelineError(f"method.transition={self.transition}: choose one of {', '.join(TRANSITIONS)}")
        if self.transition == "low_rank" and not self.per_layer:
            raise PipelineError(f"method {self.name}: transition=low_rank needs per_layer=true")
        if not isinstance(self.chained, bool):
            raise PipelineError(f"method.chained={self.chained!r}: must be true or false")
        if self.chained and self.transition != "low_rank":
            raise PipelineError(f"method {self.name}: chained=true needs transition=low_rank")
        if (self.per_layer or self.train) and self.r1 == "none":
            raise PipelineError(f"method {self.name}: per_layer/train need an r1 to start from")

    @property
    def rotates(self) -> bool:
        return self.r1 != "none" or self.r2 != "none" or self.online_r3 or self.online_r4

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict) -> "MethodSpec":
        fields = tuple(cls.__dataclass_fields__)
        known = {k: cfg[k] for k in fields if k in cfg}
        if "name" not in known:
            raise PipelineError("method config has no name")
        return cls(**known)


def quant_spec(cfg: DictConfig | dict) -> QuantSpec:
    """``QuantSpec`` from a ``quant`` config node; bad values become one-line PipelineErrors."""
    fields = tuple(QuantSpec.__dataclass_fields__)
    try:
        return QuantSpec(**{k: cfg[k] for k in fields if k in cfg})
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc)) from None


def _rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return orthogonal_hadamard(n)
    return orthogonal_hadamard(n, seed=seed)


def per_layer_bases(R1: torch.Tensor, n_layers: int) -> dict[str, torch.Tensor]:
    """``A.0..A.L`` and ``B.0..B.<L-1>`` all equal to ``R1``: every transition starts at the identity."""
    bases = {f"A.{i}": R1.clone() for i in range(n_layers + 1)}
    bases.update({f"B.{i}": R1.clone() for i in range(n_layers)})
    return bases


def make_rotations(method: MethodSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's untrained rotations, float64.

    Global: ``R1`` (D, D) and ``R2.<i>`` (hd, hd). Per-layer: ``A.0..A.L``, ``B.0..B.<L-1>``, all equal
    to R1 (every transition starts at the identity), and ``R2.<i>``.
    """
    dims = adapter_for(model).dims(model)
    rotations: dict[str, torch.Tensor] = {}
    if method.r1 != "none":
        R1 = _rotation(method.r1, dims.hidden, method.seed)
        rotations.update(per_layer_bases(R1, dims.n_layers) if method.per_layer else {"R1": R1})
    if method.r2 != "none":
        for i in range(dims.n_layers):
            rotations[f"R2.{i}"] = _rotation(method.r2, dims.head_dim, method.seed + 1 + i)
    return rotations


def check_rotations(rotations: dict[str, torch.Tensor], method: MethodSpec, model: nn.Module) -> None:
    """Refuse (one line) a rotation set whose names or shapes do not fit ``method`` and ``model``."""
    dims = adapter_for(model).dims(model)
    hd, D, L = dims.head_dim, dims.hidden, dims.n_layers
    expected: dict[str, tuple[int, int]] = {}
    if method.r1 != "none" and method.per_layer:
        expected.update({f"A.{i}": (D, D) for i in range(L + 1)})
        expected.update({f"B.{i}": (D, D) for i in range(L)})
    elif method.r1 != "none":
        expected["R1"] = (D, D)
    if method.r2 != "none":
        expected.update({f"R2.{i}": (hd, hd) for i in range(L)})
    missing, extra = sorted(set(expected) - set(rotations)), sorted(set(rotations) - set(expected))
    if missing or extra:
        raise PipelineError(
            f"rotation set does not fit method {method.name}: "
            + (f"lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"has unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}" if extra else "")
        )
    for key, shape in expected.items():
        got = tensor_shape(rotations, key)
        if got != shape:
            raise PipelineError(f"{key} has shape {got}, this model needs {shape}")
    for key in expected:  # one matrix at a time: a lazy per-layer set stays on disk
        check_orthogonal(key, rotations[key])


ORTHO_TOL = 1e-4  # bound on ||R^T R x - x|| / ||x||; a float32-stored rotation is ~1e-6 from orthogonal
ORTHO_PROBES = 8


def check_orthogonal(key: str, R: torch.Tensor) -> None:
    """Refuse (one line) a matrix that is not a rotation: ``max_j ||RᵀR x_j - x_j|| / ||x_j||`` over
    ``ORTHO_PROBES`` seeded Gaussian probes ``x_j``, in float64, must be at most ``ORTHO_TOL``.

    Probes cost O(n² · probes) where the exact ``RᵀR - I`` costs O(n³) (Llama-3-8B's per-layer set is
    129 matrices of 4096²). A non-orthogonal ``R`` (``RᵀR - I = E ≠ 0``) passes only if every probe
    lies near ``ker E``, which seeded Gaussian probes do with probability 0."""
    R = R.detach().to("cpu", torch.float64)
    x = torch.randn(R.shape[1], ORTHO_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = ((R.T @ (R @ x) - x).norm(dim=0) / x.norm(dim=0)).max().item()
    if not err <= ORTHO_TOL:  # NaN fails too
        raise PipelineError(f"rotation {key} is not orthogonal: ||R^T R x - x|| / ||x|| = {err:.2e} "
                            f"> {ORTHO_TOL:.0e}; it cannot be fused (rerun the stage that makes it)")


def prepare_layer_base(layer: nn.Module, adapter: DecoderAdapter, method: MethodSpec, quant: QuantSpec) -> None:
    """``prepare_base`` for one decoder layer: fold (or replace) its norms, fuse R4, attach its online ops."""
    if method.rotates:
        fold_layer_norms(layer, adapter)
    else:
        replace_layer_norms(layer, adapter)
    if method.online_r4:
        fuse_r4(layer, adapter)
    attach_layer_online_ops(layer, adapter, method, quant)


def prepare_head_base(model: nn.Module, adapter: DecoderAdapter, method: MethodSpec) -> None:
    """``prepare_base`` for what is not a decoder layer: untie lm_head, fold (or replace) the final norm,
    route attention through the online ops."""
    untie_embeddings(model, adapter)  # every method: one checkpoint layout for all
    prepare_output_base(model, adapter, method)
    use_online_attention(model)


def prepare_output_base(model: nn.Module, adapter: DecoderAdapter, method: MethodSpec) -> None:
    """The final norm: folded into lm_head for a rotating method, else made dtype-faithful."""
    (fold_final_norm if method.rotates else replace_final_norm)(model, adapter)


def prepare_base(model: nn.Module, method: MethodSpec, quant: QuantSpec) -> DecoderAdapter:
    """Everything but the rotation set and weight quant: untie, fold norms, fuse R4, online ops.

    The result computes the original function (up to activation/KV quant); rotation training
    parametrizes its weights, ``prepare_model`` fuses a rotation set into them. Every step acts on one
    tensor at a time, so ``prepare_layer_base`` on each layer in turn (the streamed fuse) gives the
    very same weights.
    """
    adapter = adapter_for(model)
    prepare_head_base(model, adapter, method)
    for layer in adapter.layers(model):
        prepare_layer_base(layer, adapter, method, quant)
    return adapter


def transition_keys(n_layers: int) -> list[str]:
    """The 2L residual adds in stream order: ``attn.<i>``, ``ffn.<i>``."""
    return [key for key, _, _ in transition_chain(n_layers)]


def check_subspace(subspace: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse (one line) a subspace set that does not name ``Q``/``M`` of every transition of ``model``."""
    dims = adapter_for(model).dims(model)
    for key in transition_keys(dims.n_layers):
        Q, M = subspace.get(f"Q.{key}"), subspace.get(f"M.{key}")
        if Q is None or M is None:
            raise PipelineError(f"subspace set lacks Q.{key}/M.{key}: it was not made for this model's {dims.n_layers} layers")
        r = Q.shape[-1]
        if Q.dim() != 2 or Q.shape[0] != dims.hidden or tuple(M.shape) != (r, r):
            raise PipelineError(f"subspace {key}: Q {tuple(Q.shape)} / M {tuple(M.shape)} do not fit hidden size {dims.hidden}")


def check_fuse_inputs(model: nn.Module, method: MethodSpec, rotations: dict[str, torch.Tensor],
                      subspace: dict[str, torch.Tensor] | None) -> None:
    """Refuse (one line) a rotation set or subspace set that does not fit ``method`` and ``model``."""
    check_rotations(rotations, method, model)
    if method.transition == "low_rank":
        if subspace is None:
            raise PipelineError(f"method {method.name} has low-rank transitions: run the approximate stage first")
        check_subspace(subspace, model)
    elif subspace is not None:
        raise PipelineError(f"method {method.name} has no low-rank transitions, but a subspace set was given")


@torch.no_grad()
def fuse_steps(steps: list, bases: dict[str, torch.Tensor], chunk_elements: int = F64_CHUNK_ELEMENTS) -> None:
    """Apply rotation-plan ``steps`` to their tensors in float64 with ``bases`` (float64), in place.

    A tensor whose transforms act on each row alone (``reader``, ``head_cols``: the embedding, lm_head,
    q/k/v, gate/up) goes through in row chunks of ``chunk_elements`` (``surgery.in_float64``), so
    Llama-3-8B's (128256, 4096) embedding needs 64 MiB float64 chunks, not two 4.2 GB copies.
    """
    for module, attr, transforms in steps:
        rowwise = all(fn in (reader, head_cols) for fn, _ in transforms)
        in_float64(getattr(module, attr), lambda t: transform_tensor(t, transforms, bases),
                   chunk_elements if rowwise else None)


def empty_transitions(kind: str) -> nn.Module | None:
    """The model-level transition module a fuse fills layer by layer (``FusionBases.layer``)."""
    return {"dense": DenseTransitions({}), "low_rank": LowRankTransitions({}, {})}.get(kind)


@torch.no_grad()
def fuse_layer(layer: nn.Module, i: int, adapter: DecoderAdapter, bases: FusionBases,
               transitions: nn.Module | None) -> list[str]:
    """Fuse decoder layer ``i``'s part of a rotation set (``bases.layer(i)``) into its weights and
    register its transitions' buffers in ``transitions``; returns their names. The per-layer step of
    the whole-model fuse (``apply_rotation_set``) and of the streamed one (``fuse.streamed``)."""
    layer_bases, layer_transitions = bases.layer(i)
    fuse_steps(layer_steps(layer, i, adapter), layer_bases)
    for name, t in layer_transitions.items():
        transitions.register_buffer(name, t)
    return list(layer_transitions)


@torch.no_grad()
def apply_rotation_set(model: nn.Module, adapter: DecoderAdapter, rotations: dict[str, torch.Tensor],
                       subspace: dict[str, torch.Tensor] | None = None, chained: bool = False) -> None:
    """Fuse a rotation set into the weights in float64; per-layer sets also get their transitions:
    dense ``T - I``, or, given a ``subspace`` set (``Q.<key>``, ``M.<key>``), the rank-r ones. The
    weights are fused in the trained bases (the paper's ReSpinQuant: ``T̂`` replaces ``T``, a function
    error at r < D), or with ``chained`` in the bases chained from the ``T̂`` (``subspace.chained_bases``),
    so the quantization-off model computes the original function at every rank.

    Every matrix is re-orthonormalised in float64 first (trained sets are stored in float32, orthogonal
    to ~1e-7 only), so the fused model stays function-preserving to float64 precision. The work goes
    part by part in stream order (``FusionBases``), as the streamed fuse does it.
    """
    device = adapter.embedding(model).weight.device
    bases = FusionBases(rotations, adapter.dims(model).n_layers, subspace, device,
                        adapter.embedding(model).weight.dtype, chained)
    fuse_steps(embedding_steps(model, adapter), bases.embedding())
    transitions = empty_transitions(bases.transitions)
    for i, layer in enumerate(adapter.layers(model)):
        fuse_layer(layer, i, adapter, bases, transitions)
    fuse_steps(head_steps(model, adapter), bases.head())
    if transitions is not None:
        attach_transition_module(model, adapter, transitions)


def prepare_model(
    model: nn.Module, method: MethodSpec, rotations: dict[str, torch.Tensor], quant: QuantSpec,
    subspace: dict[str, torch.Tensor] | None = None, calib: torch.Tensor | None = None,
) -> nn.Module:
    """Transform ``model`` in place for ``method`` at ``quant`` and return it.

    Order: untie -> fold norms (if the method rotates) -> R4 fused -> online ops attached -> rotation
    set fused (+ dense or low-rank transitions) -> weights quantized (RTN, or GPTQ on ``calib``
    windows (N, T) with every online op active).
    """
    check_fuse_inputs(model, method, rotations, subspace)
    adapter = prepare_base(model, method, quant)
    apply_rotation_set(model, adapter, rotations, subspace, method.chained)
    quantize_weights(model, adapter, quant, calib)
    return model


def quantize_weights(model: nn.Module, adapter: DecoderAdapter, quant: QuantSpec, calib: torch.Tensor | None) -> None:
    """Quantize every decoder linear's weight with ``quant.weight_method`` (embedding/lm_head stay)."""
    if quant.w_bits >= OFF_BITS:
        return
    if quant.weight_method == "gptq":
        if calib is None:
            raise PipelineError("quant.weight_method=gptq needs calibration windows (run the calibrate stage)")

        gptq_model(model, adapter, calib, quant)
    else:
        quantize_linear_weights(model, adapter, quant)


@torch.no_grad()
def quantize_layer_rtn(layer: nn.Module, adapter: DecoderAdapter, quant: QuantSpec) -> None:
    """RTN (per-output-channel or per-group symmetric, MSE clip) on one decoder layer's linears."""
    if quant.w_bits >= OFF_BITS:
        return
    for name in adapter.layer_linear_names(layer):
        linear = get_linear(layer, name)
        w = linear.weight.to(torch.float32) if linear.weight.dtype != torch.float64 else linear.weight
        codes, scale = rtn(w, quant.w_bits, quant.w_mse_clip, quant.w_group_size)
        linear.weight.copy_(dequantize(codes, scale, linear.weight.dtype))
        layer.get_submodule(name).weight_scale = scale.to(linear.weight.dtype)


def quantize_linear_weights(model: nn.Module, adapter: DecoderAdapter, quant: QuantSpec) -> None:
    """RTN on every decoder linear."""
    for layer in adapter.layers(model):
        quantize_layer_rtn(layer, adapter, quant)


def attach_layer_online_ops(layer: nn.Module, adapter: DecoderAdapter, method: MethodSpec, quant: QuantSpec) -> None:
    """Wrap a decoder layer's linears in ``QuantLinear`` and give its attention the R3/KV ops."""
    writers = adapter.mlp_writers(layer)
    for name in adapter.layer_linear_names(layer):
        act = ActQuantizer(quant.a_bits, quant.a_clip_ratio) if quant.a_bits < OFF_BITS else None
        online = method.online_r4 and name in writers
        set_module(layer, name, QuantLinear(get_linear(layer, name), act, online))
    adapter.attention(layer).rsq_online = OnlineAttention(method.online_r3, quant.kv_bits, quant.kv_clip_ratio)


def attach_online_ops(model: nn.Module, adapter: DecoderAdapter, method: MethodSpec, quant: QuantSpec) -> None:
    """Wrap every decoder linear in ``QuantLinear`` and give attention its R3/KV ops."""
    use_online_attention(model)
    for layer in adapter.layers(model):
        attach_layer_online_ops(layer, adapter, method, quant)
