"""The fused checkpoint: fused (fake-)quantized weights + the online ops, as safetensors + JSON.

Layout of ``<dir>``:
- ``model.safetensors``: the transformed model's state dict (norms folded, rotations fused, weights on
  the quantization grid), metadata naming the model fingerprint;
- ``rsq_config.json``: method and quant specs (which online ops to attach), the base model config and
  the fingerprint.
``load_fused(dir)`` rebuilds the stock HF model, applies the same structural transforms (untie, norm
swap, wrappers, attention ops) and loads the weights: its logits equal the in-memory model's.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .adapters import adapter_for
from .artifacts import atomic_dir, load_tensors, save_tensors
from .errors import PipelineError
from .methods import MethodSpec, attach_online_ops
from .models import load_model, model_fingerprint
from .quantizers import QuantSpec
from .surgery import replace_norms, untie_embeddings
from .transitions import DenseTransitions, attach_dense_transitions

WEIGHTS = "model.safetensors"
CONFIG = "rsq_config.json"


def save_fused(
    folder: str | Path, model: nn.Module, method: MethodSpec, quant: QuantSpec,
    model_cfg: DictConfig | dict, fingerprint: str,
) -> None:
    """Write the checkpoint into ``folder`` atomically (a temp folder renamed into place)."""
    config = {
        "method": asdict(method),
        "quant": asdict(quant),
        "model": OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg,
        "fingerprint": fingerprint,
    }
    with atomic_dir(folder) as staging:
        save_tensors(staging / WEIGHTS, model.state_dict(), {"fingerprint": fingerprint, "method": method.name})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_fused(folder: str | Path, model_cfg: DictConfig | dict | None = None) -> tuple[nn.Module, object]:
    """Rebuild the fused model saved by ``save_fused``; returns ``(model, tokenizer)``.

    ``model_cfg`` overrides the base-model config stored in the checkpoint (e.g. a moved local path).
    """
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise PipelineError(f"{folder} is not a fused checkpoint (no {CONFIG}): run the fuse stage first")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{config_path} is not valid JSON ({exc})") from None
    model, tok = load_model(model_cfg if model_cfg is not None else config["model"])
    fingerprint = model_fingerprint(model)
    if fingerprint != config["fingerprint"]:
        raise PipelineError(
            f"{folder} was made for another model (fingerprint {config['fingerprint']}, this one {fingerprint})"
        )
    method, quant = MethodSpec(**config["method"]), QuantSpec(**config["quant"])
    adapter = adapter_for(model)
    untie_embeddings(model, adapter)
    replace_norms(model, adapter)
    attach_online_ops(model, adapter, method, quant)
    if method.per_layer:
        dims = adapter.dims(model)
        dtype = adapter.embedding(model).weight.dtype
        attach_dense_transitions(model, adapter, DenseTransitions.zeros(dims.n_layers, dims.hidden, dtype))
    tensors, _ = load_tensors(folder / WEIGHTS, fingerprint)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, tok
