"""The quantized checkpoint: packed integer weights, scales, online operators, config: safetensors + JSON.

Layout of ``<dir>`` (self-contained: loading needs neither the base model nor this project's config):
- ``model.safetensors``: every decoder linear as ``<prefix>.linear.qweight`` (int4 nibbles, two per
  byte along K, low nibble = even k; int8 codes above 4 bits) and ``<prefix>.weight_scale`` (out, G);
  the residual transitions (``rsq_transitions.Q_*``/``M_*`` rank-r, or dense ``T - I``); the 16-bit
  tensors (embedding, lm_head, biases, unit norms). Metadata names the model fingerprint.
- ``rsq_config.json``: format version, method and quant specs (which online ops to attach), the
  online operators (Hadamard sizes of R3/R4, transition kind and ranks), dtype and fingerprint.
- ``config.json`` and the tokenizer files: the base model's HF config (untied) and tokenizer.

``load_quantized(dir)`` rebuilds the HF model from ``config.json``, attaches the same online ops,
unpacks the weights with the formula the in-memory quantizer used, and loads everything: its logits
equal the in-memory model's exactly.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .artifacts import atomic_dir, load_tensors, save_tensors
from .errors import PipelineError
from .methods import MethodSpec, attach_online_ops, quant_spec, transition_keys
from .models import DTYPES, model_fingerprint
from .online import QuantLinear
from .quantizers import QuantSpec
from .surgery import replace_norms, untie_embeddings
from .transitions import DenseTransitions, LowRankTransitions, attach_transition_module
from .weight_quant import dequantize, expand, pack, unpack

WEIGHTS = "model.safetensors"
CONFIG = "rsq_config.json"
FORMAT = 2
TRANSITIONS = "rsq_transitions."


def _packed_state(model: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """The state dict with each quantized linear's float weight replaced by its packed codes.

    Refuses to write codes that would not reload to the very same weights.
    """
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or module.weight_scale is None:
            continue
        weight = module.linear.weight.detach()
        scale = module.weight_scale
        codes = torch.round(weight.float() / expand(scale.float(), weight.shape[1])).to(torch.int8)
        if not torch.equal(dequantize(codes, scale, weight.dtype), weight):
            raise PipelineError(f"{name}: weights are not on their quantization grid; cannot pack them")
        del state[f"{name}.linear.weight"]
        state[f"{name}.linear.qweight"] = pack(codes, bits)
    return state


def _online_ops(model: nn.Module, method: MethodSpec) -> dict[str, Any]:
    dims = adapter_for(model).dims(model)
    transitions = getattr(model, "rsq_transitions", None)
    kind = {DenseTransitions: "dense", LowRankTransitions: "low_rank"}.get(type(transitions), "none")
    return {
        "r3_hadamard_size": dims.head_dim if method.online_r3 else None,
        "r4_hadamard_size": dims.intermediate if method.online_r4 else None,
        "transitions": kind,
        "transition_ranks": transitions.ranks() if kind == "low_rank" else None,
    }


def save_quantized(
    folder: str | Path, model: nn.Module, tokenizer: Any, method: MethodSpec, quant: QuantSpec,
    fingerprint: str, extra: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint of a prepared model into ``folder`` atomically (temp folder renamed in)."""
    config = {
        "format": FORMAT,
        "method": asdict(method),
        "quant": asdict(quant),
        "online": _online_ops(model, method),
        "dtype": str(adapter_for(model).embedding(model).weight.dtype).removeprefix("torch."),
        "fingerprint": fingerprint,
        **(extra or {}),
    }
    state = _packed_state(model, quant.w_bits)
    with atomic_dir(folder) as staging:
        save_tensors(staging / WEIGHTS, state, {"fingerprint": fingerprint, "method": method.name})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise PipelineError(f"{folder} is not a quantized checkpoint (no {CONFIG}): run the fuse stage first")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{config_path} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise PipelineError(f"{folder} has checkpoint format {config.get('format')}, this version reads {FORMAT}: rerun fuse")
    return config


BACKENDS = ("fake", "kernel")


def load_quantized(folder: str | Path, backend: str = "fake") -> nn.Module:
    """The runnable HF model saved by ``save_quantized`` (eval mode, online ops attached).

    ``backend``: ``fake`` (float fake quantization, any bit setting) or ``kernel`` (W4A4 only: every
    quantized linear runs on the integer kernels as a ``linear4bit.Linear4bit``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if backend not in BACKENDS:
        raise PipelineError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    folder = Path(folder)
    config = _read_config(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}/config.json is not a readable model config ({str(exc).splitlines()[0]})") from None
    model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[config["dtype"]], attn_implementation="sdpa")
    fingerprint = model_fingerprint(model)
    if fingerprint != config["fingerprint"]:
        raise PipelineError(
            f"{folder} was made for another model (fingerprint {config['fingerprint']}, its config.json gives {fingerprint})"
        )
    tensors, _ = load_tensors(folder / WEIGHTS, fingerprint)
    try:
        method, quant = MethodSpec(**config["method"]), quant_spec(config["quant"])
        kind = config["online"]["transitions"]
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{folder}/{CONFIG} lacks or mistypes an entry ({exc})") from None
    adapter = adapter_for(model)
    untie_embeddings(model, adapter)
    replace_norms(model, adapter)
    attach_online_ops(model, adapter, method, quant)
    if kind != "none":
        state = {k[len(TRANSITIONS):]: v for k, v in tensors.items() if k.startswith(TRANSITIONS)}
        module = DenseTransitions(state) if kind == "dense" else LowRankTransitions.from_state(state)
        expected = {k.replace(".", "_") for k in transition_keys(adapter.dims(model).n_layers)}
        if set(module.keys()) != expected:
            raise PipelineError(f"{folder}/{WEIGHTS} does not hold the {len(expected)} {kind} transitions its config names")
        attach_transition_module(model, adapter, module)
    dtype = adapter.embedding(model).weight.dtype
    for key in [k for k in tensors if k.endswith(".linear.qweight")]:
        prefix = key[: -len(".linear.qweight")]
        scale = tensors.get(f"{prefix}.weight_scale")
        if scale is None:
            raise PipelineError(f"{folder}/{WEIGHTS} has packed {prefix} weights but no {prefix}.weight_scale")
        model.get_submodule(prefix).weight_scale = scale
        tensors[f"{prefix}.linear.weight"] = dequantize(unpack(tensors.pop(key), quant.w_bits), scale, dtype)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"{folder}/{WEIGHTS} does not fit its config ({str(exc).splitlines()[0][:200]})") from None
    if backend == "kernel":
        if (quant.w_bits, quant.a_bits) != (4, 4) or quant.w_group_size:
            raise PipelineError(f"backend=kernel runs W4A4 with per-channel weight scales; {folder} is "
                                f"W{quant.w_bits}A{quant.a_bits} (group size {quant.w_group_size})")
        from .linear4bit import use_kernels

        use_kernels(model)
    model.eval()
    return model


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved beside a quantized checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
