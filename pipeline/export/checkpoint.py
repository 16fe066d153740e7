"""The quantized checkpoint: packed integer weights, scales, online operators, config: safetensors + JSON.

Layout of ``<dir>`` (format 4; self-contained: loading needs neither the base model nor this project's
config):
- ``model-<j>-of-<L+1>.safetensors``: shard j <= L is decoder layer j - 1, every linear as
  ``<prefix>.linear.qweight`` (int4 nibbles, two per byte along K, low nibble = even k; int8 codes
  above 4 bits) and ``<prefix>.weight_scale`` (out, G), its biases and unit norms, and the transitions
  of its two residual adds (``rsq_transitions.Q_*_<i>``/``M_*_<i>`` rank-r, or dense ``T - I``). Shard
  L + 1 holds the 16-bit embedding, final norm and lm_head. Each shard's metadata names the fingerprint.
- ``model.safetensors.index.json``: HF's weight map, plus the sha256 of every shard, of
  ``rsq_config.json`` and of every other file (``config.json``, the tokenizer's), checked on load: an
  edited config (its ``rms_norm_eps`` or ``rope_theta`` too) or a flipped byte is refused.
- ``rsq_config.json``: format version, method and quant specs (which online ops to attach), the
  online operators (Hadamard sizes of R3/R4, transition kind and ranks), dtype and fingerprint.
- ``config.json`` and the tokenizer files: the base model's HF config (untied) and tokenizer.

``load_quantized(dir)`` builds the HF model as an empty skeleton from ``config.json``, attaches the
same online ops, and reads the shards one at a time, unpacking the weights with the formula the
in-memory quantizer used: its logits equal the in-memory model's exactly. ``open_quantized`` loads
only the non-layer shard and returns a reader for layer-sequential use.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from ..model.adapters import adapter_for
from ..infra.artifacts import SAFETENSORS_DTYPES, SafetensorsFile, atomic_dir, check_finite, file_sha256, is_finite
from ..infra.devices import DTYPES, dtype_name
from ..infra.errors import PipelineError
from ..infra.settings import SETTING_KEY, check_setting
from ..methods import MethodSpec, attach_online_ops, empty_transitions, quant_spec
from ..model.load import WEIGHTS_ATTR, model_fingerprint, tag_weights
from ..model.streaming import empty_model, open_model, release
from ..surgery.online import QuantLinear
from ..quant.quantizers import QuantSpec
from ..surgery.weights import replace_norms, untie_embeddings
from ..surgery.transitions import DenseTransitions, LowRankTransitions, attach_transition_module
from ..quant.codes import dequantize, expand, pack, unpack
from .linear4bit import use_kernels

INDEX = "model.safetensors.index.json"
CONFIG = "rsq_config.json"
FORMAT = 4
TRANSITIONS = "rsq_transitions."


def shard_name(j: int, n_layers: int) -> str:
    """Shard ``j`` (1-based) of a checkpoint: decoder layer ``j - 1`` for ``j <= L``, the rest at ``L + 1``."""
    return f"model-{j:05d}-of-{n_layers + 1:05d}.safetensors"


def packed_state(module: nn.Module, prefix: str, bits: int) -> dict[str, torch.Tensor]:
    """``module``'s state dict (names ``prefix + name``), each quantized linear's float weight
    replaced by its packed codes. Refuses codes that would not reload to the very same weights."""
    state = {prefix + k: v for k, v in module.state_dict().items()}
    for name, sub in module.named_modules():
        if not isinstance(sub, QuantLinear) or sub.weight_scale is None:
            continue
        weight = sub.linear.weight.detach()
        scale = sub.weight_scale
        codes = torch.round(weight.float() / expand(scale.float(), weight.shape[1])).to(torch.int8)
        if not torch.equal(dequantize(codes, scale, weight.dtype), weight):
            raise PipelineError(f"{prefix}{name}: weights are not on their quantization grid (non-finite or "
                                "off-grid values); cannot pack them")
        del state[f"{prefix}{name}.linear.weight"]
        state[f"{prefix}{name}.linear.qweight"] = pack(codes, bits)
    return state


def layer_state(model: nn.Module, adapter, i: int, bits: int) -> dict[str, torch.Tensor]:
    """Shard ``i + 1``: decoder layer ``i`` packed, and the transitions of its two residual adds."""
    state = packed_state(adapter.layers(model)[i], adapter.layer_prefix(i), bits)
    transitions = getattr(model, "rsq_transitions", None)
    if transitions is not None:
        own = _transition_buffers(type(transitions), i)
        state.update({TRANSITIONS + name: buf for name, buf in transitions.named_buffers() if name in own})
    return state


def rest_state(model: nn.Module, adapter) -> dict[str, torch.Tensor]:
    """The last shard: what is neither a decoder layer nor a transition (embedding, final norm, lm_head)."""
    layer_root = adapter.layer_prefix(0)[: -len("0.")]
    return {k: v for k, v in model.state_dict().items() if not k.startswith((layer_root, TRANSITIONS))}


def online_ops(dims, method: MethodSpec, kind: str, ranks: dict[str, int] | None) -> dict[str, Any]:
    """The ``online`` entry of ``rsq_config.json``: which run-time operators the weights were fused for."""
    return {
        "r3_hadamard_size": dims.head_dim if method.online_r3 else None,
        "r4_hadamard_size": dims.intermediate if method.online_r4 else None,
        "transitions": kind,
        "transition_ranks": ranks if kind == "low_rank" else None,
    }


def transition_kind(model: nn.Module) -> str:
    transitions = getattr(model, "rsq_transitions", None)
    return {DenseTransitions: "dense", LowRankTransitions: "low_rank"}.get(type(transitions), "none")


class CheckpointWriter:
    """Writes a checkpoint shard by shard into a staging folder (module doc for the layout)."""

    def __init__(self, folder: Path, n_layers: int, fingerprint: str) -> None:
        self.folder, self.n_layers, self.fingerprint = Path(folder), n_layers, fingerprint
        self.weight_map: dict[str, str] = {}
        self.sha256: dict[str, str] = {}

    def write(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard ``j`` (1-based) and record its keys and sha256."""
        from safetensors.torch import save_file

        name = shard_name(j, self.n_layers)
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        check_finite(flat, f"the checkpoint (shard {name})")
        # one metadata key: safetensors writes a map's keys in no fixed order, so one key keeps the
        # bytes (and DVC's hash) of identical fuses identical
        save_file(flat, str(self.folder / name), metadata={"fingerprint": self.fingerprint})
        self.sha256[name] = file_sha256(self.folder / name)
        self.weight_map.update({k: name for k in flat})

    def finish(self, config: dict[str, Any]) -> None:
        """Write ``rsq_config.json`` and the index, which records the sha256 of it, of every shard and
        of every other file already in the folder (write ``config.json`` and the tokenizer first)."""
        if len(self.sha256) != self.n_layers + 1:
            raise RuntimeError(f"checkpoint has {len(self.sha256)} of {self.n_layers + 1} shards")
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (self.folder / CONFIG).write_text(text)
        others = {p.name: file_sha256(p) for p in sorted(self.folder.iterdir())
                  if p.is_file() and p.name not in self.sha256 and p.name not in (CONFIG, INDEX)}
        index = {"metadata": {"format": f"rsq-{FORMAT}", "fingerprint": self.fingerprint,
                              "rsq_config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                              "shard_sha256": dict(sorted(self.sha256.items())), "file_sha256": others},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def checkpoint_config(method: MethodSpec, quant: QuantSpec, online: dict, dtype: torch.dtype, fingerprint: str,
                      extra: dict[str, Any] | None = None, weights: str | None = None) -> dict[str, Any]:
    """``rsq_config.json``: ``weights_id`` is the source model's (``load.weights_id``), which the loader
    puts back on the rebuilt skeleton so that its fingerprint can be checked against ``fingerprint``."""
    return {"format": FORMAT, "method": asdict(method), "quant": asdict(quant), "online": online,
            "dtype": dtype_name(dtype), "fingerprint": fingerprint, "weights_id": weights, **(extra or {})}


def save_quantized(
    folder: str | Path, model: nn.Module, tokenizer: Any, method: MethodSpec, quant: QuantSpec,
    fingerprint: str, extra: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint of a prepared in-memory model into ``folder`` atomically (temp folder
    renamed in). The streamed fuse (``fuse.streamed``) writes the very same files layer by layer."""
    adapter = adapter_for(model)
    dims = adapter.dims(model)
    kind = transition_kind(model)
    ranks = model.rsq_transitions.ranks() if kind == "low_rank" else None
    config = checkpoint_config(method, quant, online_ops(dims, method, kind, ranks),
                               adapter.embedding(model).weight.dtype, fingerprint, extra,
                               getattr(model, WEIGHTS_ATTR, None))
    with atomic_dir(folder) as staging:
        writer = CheckpointWriter(staging, dims.n_layers, fingerprint)
        for i in range(dims.n_layers):
            writer.write(i + 1, layer_state(model, adapter, i, quant.w_bits))
        writer.write(dims.n_layers + 1, rest_state(model, adapter))
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        writer.finish(config)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc})") from None


def _identity(folder: Path) -> tuple[int, int] | None:
    """The folder's (device, inode): a fuse publishing onto it swaps in another folder (``publish``)."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _mismatch(folder: Path, identity: tuple[int, int] | None, message: str) -> PipelineError:
    """``message`` for a file that does not match the index, unless the folder itself was replaced
    since reading began: then a concurrent fuse published a new checkpoint, and that is what is said."""
    if identity is not None and _identity(folder) != identity:
        return PipelineError(f"{folder} was replaced while it was being read (a fuse published a new checkpoint "
                             "there meanwhile): load it again")
    return PipelineError(message)


def _read_config(folder: Path, identity: tuple[int, int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``rsq_config.json`` and the index, the config checked against the sha256 the index records.
    ``identity``: the folder's ``_identity`` when reading began (default: now)."""
    identity = identity or _identity(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise PipelineError(f"{folder} is not a quantized checkpoint (no {CONFIG}): run the fuse stage first")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise PipelineError(f"{config_path} is not a checkpoint config (a JSON object)")
    if config.get("format") != FORMAT:
        raise PipelineError(f"{folder} has checkpoint format {config.get('format')}, this version reads {FORMAT}: rerun fuse")
    if not (folder / INDEX).is_file():
        raise PipelineError(f"{folder / INDEX} is missing: the checkpoint is incomplete; rerun fuse")
    index = _read_json(folder / INDEX)
    try:
        meta, _ = index["metadata"], index["weight_map"]
        expected = meta["rsq_config_sha256"], meta["shard_sha256"], dict(meta["file_sha256"])
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{folder / INDEX} is not a checkpoint index (no metadata.shard_sha256/file_sha256)") from None
    if hashlib.sha256(config_path.read_bytes()).hexdigest() != expected[0]:
        raise _mismatch(folder, identity, f"{config_path} does not match the sha256 recorded in {INDEX}: it was "
                        "edited or corrupted after fuse (its method and bit-widths decide the online ops); rerun fuse")
    for name, digest in expected[2].items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise _mismatch(folder, identity, f"{path} is missing or does not match the sha256 recorded in {INDEX}: it was "
                                "edited or corrupted after fuse; rerun fuse")
    return config, index


def check_made_for(folder: str | Path, model_cfg, method: MethodSpec, quant: QuantSpec,
                   setting: dict | None = None) -> dict[str, Any]:
    """Refuse (one line naming the folder) a checkpoint that was not made for the configured model,
    method and quant: what the checkpoint records (its model's fingerprint and name, its method and
    quant specs, and with ``setting`` the whole setting it was fused under, ``settings.output_setting``)
    must be what the consumer is about to label its results with. Returns its config."""
    folder = Path(folder)
    config, _ = _read_config(folder)
    skeleton = open_model(model_cfg, torch.float32)[0]  # sizes only; no weights read
    name = config.get("model_name")
    if config.get("fingerprint") != model_fingerprint(skeleton) or (name is not None and name != model_cfg.get("name")):
        raise PipelineError(f"{folder} was made for model {name or '?'} (fingerprint {config.get('fingerprint')}), "
                            f"not for model={model_cfg.get('name')}: evaluate it with that model's config")
    for what, recorded, wanted in (("method", config.get("method"), asdict(method)),
                                   ("quant", config.get("quant"), asdict(quant))):
        if recorded != wanted:
            diff = sorted(k for k in wanted if not isinstance(recorded, dict) or recorded.get(k) != wanted[k])
            shown = ", ".join(f"{k}={recorded.get(k) if isinstance(recorded, dict) else '?'} (config: {wanted[k]})"
                              for k in diff[:3])
            raise PipelineError(f"{folder} holds another {what} than the configured one: {shown}; rerun fuse")
    if setting is not None:
        check_setting(folder, config.get(SETTING_KEY), setting, "rerun fuse with this run's settings")
    return config


BACKENDS = ("fake", "kernel")


class CheckpointReader:
    """Loads a checkpoint's shards into a model skeleton: all at once (``load_quantized``) or one decoder
    layer at a time (``open_quantized``, layer-sequential evaluation). Each shard's sha256 is checked
    against the index before it is read, and every tensor must have the skeleton's dtype and be finite."""

    def __init__(self, folder: Path, index: dict, model: nn.Module, quant: QuantSpec, dtype: torch.dtype,
                 device: torch.device, identity: tuple[int, int] | None = None) -> None:
        self.folder, self.index, self.model, self.quant = folder, index, model, quant
        self.identity = identity  # the folder's _identity when reading began: a swap is said as one
        self.dtype, self.device = dtype, device
        self.adapter = adapter_for(model)
        self.n_layers = self.adapter.dims(model).n_layers
        self.fingerprint = index["metadata"].get("fingerprint")

    def _shard(self, j: int) -> dict[str, torch.Tensor]:
        name = shard_name(j, self.n_layers)
        path = self.folder / name
        expected = self.index["metadata"]["shard_sha256"].get(name)
        if expected is None or not path.is_file():
            raise _mismatch(self.folder, self.identity, f"{path} is missing (the checkpoint index names {len(self.index['metadata']['shard_sha256'])} "
                                f"shards, this model needs {self.n_layers + 1}): rerun fuse")
        raw = path.read_bytes()  # hashed and parsed from one read: no window for a swap in between
        if hashlib.sha256(raw).hexdigest() != expected:
            raise _mismatch(self.folder, self.identity, f"{path} does not match the sha256 recorded in {INDEX}: the file was changed "
                                "or corrupted after fuse; rerun fuse")
        try:
            n = int.from_bytes(raw[:8], "little")
            made_for = (json.loads(raw[8 : 8 + n]).get("__metadata__") or {}).get("fingerprint")
            tensors = safetensors_load(raw)
        except (SafetensorError, ValueError, AttributeError) as exc:
            raise PipelineError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
        if made_for != self.fingerprint:
            raise PipelineError(f"{path} was made for model fingerprint {made_for}, its index says {self.fingerprint}: "
                                "rerun fuse")
        return tensors

    def _assign(self, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        for key, scale in tensors.items():  # scales first: they become buffers the state dict then names
            if key.endswith(".weight_scale"):
                if scale.dtype != self.dtype:
                    raise PipelineError(f"{where}: {key} is {scale.dtype}, the checkpoint's dtype is {self.dtype}")
                _check_finite(scale, key, where)
                module.get_submodule(key[len(prefix): -len(".weight_scale")]).weight_scale = scale.to(self.device)
        expected = module.state_dict(keep_vars=True)
        state = {}
        for key, value in tensors.items():
            name = key[len(prefix):]
            if name.endswith(".linear.qweight"):
                owner = name[: -len(".linear.qweight")]
                scale = tensors.get(f"{prefix}{owner}.weight_scale")
                if scale is None:
                    raise PipelineError(f"{where} has packed {prefix}{owner} weights but no {prefix}{owner}.weight_scale")
                if value.dtype not in (torch.uint8, torch.int8):
                    raise PipelineError(f"{where}: {key} is {value.dtype}, packed codes are uint8/int8")
                name = f"{owner}.linear.weight"
                bits = self.quant.w_bits
                codes = unpack(value, bits)
                lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                if codes.numel() and (codes.min().item() < lo or codes.max().item() > hi):
                    raise PipelineError(f"{where}: {key} holds codes outside the {bits}-bit range [{lo}, {hi}]: "
                                        f"these are not the W{bits} weights its {CONFIG} records; rerun fuse")
                value = dequantize(codes, scale, self.dtype)
            if name not in expected:
                raise PipelineError(f"{where} holds {key}, which this model does not have")
            if value.dtype != expected[name].dtype:
                raise PipelineError(f"{where}: {key} is {value.dtype}, the checkpoint's dtype is {expected[name].dtype}")
            _check_finite(value, key, where)
            state[name] = value.to(self.device)
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise PipelineError(f"{where} does not fit its config ({str(exc).splitlines()[0][:200]})") from None

    def load_rest(self) -> None:
        """The embedding, final norm and lm_head (the last shard)."""
        j = self.n_layers + 1
        tensors = self._shard(j)
        layer_root = self.adapter.layer_prefix(0)[: -len("0.")]
        stray = [k for k in tensors if k.startswith((layer_root, TRANSITIONS))]
        if stray:
            raise PipelineError(f"{self.folder / shard_name(j, self.n_layers)} holds {stray[0]}, which belongs in a layer shard")
        skeleton = {k: v for k, v in self.model.state_dict(keep_vars=True).items() if not k.startswith((layer_root, TRANSITIONS))}
        missing = sorted(set(skeleton) - set(tensors))
        if missing:
            raise PipelineError(f"{self.folder / shard_name(j, self.n_layers)} lacks {missing[0]}")
        for key, value in tensors.items():
            if key not in skeleton:
                raise PipelineError(f"{self.folder / shard_name(j, self.n_layers)} holds {key}, which this model does not have")
            if value.dtype != skeleton[key].dtype:
                raise PipelineError(f"{shard_name(j, self.n_layers)}: {key} is {value.dtype}, the checkpoint's dtype is {skeleton[key].dtype}")
            _check_finite(value, key, shard_name(j, self.n_layers))
        for key, value in tensors.items():
            owner, _, name = key.rpartition(".")
            module = self.model.get_submodule(owner)
            setattr(module, name, nn.Parameter(value.to(self.device), requires_grad=False)
                    if isinstance(getattr(module, name), nn.Parameter) else value.to(self.device))
        self.adapter.rotary(self.model).to(self.device)

    def load_layer(self, i: int) -> None:
        """Decoder layer ``i`` and its transitions (shard ``i + 1``)."""
        where = f"{self.folder / shard_name(i + 1, self.n_layers)}"
        tensors = self._shard(i + 1)
        prefix = self.adapter.layer_prefix(i)
        transitions = getattr(self.model, "rsq_transitions", None)
        own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        extra = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        for key, value in extra.items():
            name = key[len(TRANSITIONS):]
            if (not key.startswith(TRANSITIONS) or transitions is None
                    or name not in _transition_buffers(type(transitions), i)):
                raise PipelineError(f"{where} holds {key}, which this model does not have")
            _check_finite(value, key, where)
            transitions.register_buffer(name, value.to(self.device))
        if transitions is not None:
            have = {k for k, _ in transitions.named_buffers()}
            need = _transition_buffers(type(transitions), i)
            if not need <= have:
                raise PipelineError(f"{where} does not hold the transitions of layer {i} its config names "
                                    f"({', '.join(sorted(need - have))} missing)")
        self._assign(self.adapter.layers(self.model)[i], prefix, own, where)

    def release_layer(self, i: int) -> None:
        """Free decoder layer ``i`` and its transitions again."""
        release(self.adapter.layers(self.model)[i])
        transitions = getattr(self.model, "rsq_transitions", None)
        if transitions is not None:
            for name in _transition_buffers(type(transitions), i):
                delattr(transitions, name)


def _transition_buffers(kind: type, i: int) -> set[str]:
    if kind is LowRankTransitions:
        return {f"{m}_{s}_{i}" for m in ("Q", "M") for s in ("attn", "ffn")}
    return {f"attn_{i}", f"ffn_{i}"}


def _check_finite(t: torch.Tensor, key: str, where: str) -> None:
    if not is_finite(t):
        raise PipelineError(f"{where}: {key} holds non-finite values (NaN or inf)")


def open_quantized(folder: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, CheckpointReader]:
    """A checkpoint's model with only its embedding, final norm and lm_head loaded, and the reader that
    loads (``load_layer(i)``) and frees (``release_layer(i)``) each decoder layer: for models that do not
    fit in memory. ``load_quantized`` is this plus every layer."""
    from transformers import AutoConfig

    folder = Path(folder)
    identity = _identity(folder)
    config, index = _read_config(folder, identity)
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}/config.json is not a readable model config ({str(exc).splitlines()[0]})") from None
    try:
        dtype = DTYPES[config["dtype"]]
        method, quant = MethodSpec(**config["method"]), quant_spec(config["quant"])
        kind = config["online"]["transitions"]
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{folder}/{CONFIG} lacks or mistypes an entry ({exc})") from None
    if kind not in ("none", "dense", "low_rank"):
        raise PipelineError(f"{folder}/{CONFIG}: online.transitions={kind!r} is not none, dense or low_rank")
    model = tag_weights(empty_model(hf_config, dtype), config.get("weights_id"))
    fingerprint = model_fingerprint(model)
    if fingerprint != config["fingerprint"] or index["metadata"].get("fingerprint") != fingerprint:
        raise PipelineError(
            f"{folder} was made for another model (fingerprint {config['fingerprint']}, its config.json gives {fingerprint})"
        )
    adapter = adapter_for(model)
    untie_embeddings(model, adapter)
    replace_norms(model, adapter)
    attach_online_ops(model, adapter, method, quant)
    transitions = empty_transitions(kind)
    if transitions is not None:
        attach_transition_module(model, adapter, transitions)
    reader = CheckpointReader(folder, index, model, quant, dtype, torch.device(device), identity)
    reader.load_rest()
    return model, reader


def loaded_bytes(folder: str | Path) -> int:
    """Bytes the checkpoint's model takes once loaded (packed int4 codes unpacked to two values of its
    dtype per byte), read from the shards' headers only."""
    folder = Path(folder)
    config, index = _read_config(folder)
    unpacked = DTYPES.get(config.get("dtype"), torch.float32).itemsize
    total = 0
    for name in index["metadata"]["shard_sha256"]:
        for key, info in SafetensorsFile(folder / name).entries.items():  # one-line error if unreadable
            numel = math.prod(info["shape"])
            if key.endswith(".linear.qweight"):
                total += numel * unpacked * (2 if info["dtype"] == "U8" else 1)
            else:
                total += numel * SAFETENSORS_DTYPES[info["dtype"]].itemsize
    return total


def check_backend(backend: str, what: str = "backend") -> None:
    """Refuse, in one line naming ``what`` (the setting), a backend other than ``BACKENDS``."""
    if backend not in BACKENDS:
        raise PipelineError(f"{what}={backend!r}: choose one of {', '.join(BACKENDS)}")


def load_quantized(folder: str | Path, backend: str = "fake", device: torch.device | str = "cpu") -> nn.Module:
    """The runnable HF model saved by ``save_quantized`` (eval mode, online ops attached), on ``device``.

    ``backend``: ``fake`` (float fake quantization, any bit setting) or ``kernel`` (W4A4 only: every
    quantized linear runs on the integer kernels as a ``linear4bit.Linear4bit``). Shards are read one at
    a time, each checked against its recorded sha256.
    """
    check_backend(backend)
    model, reader = open_quantized(folder, device)
    for i in range(reader.n_layers):
        reader.load_layer(i)
    if backend == "kernel":
        quant = reader.quant
        if (quant.w_bits, quant.a_bits) != (4, 4) or quant.w_group_size:
            raise PipelineError(f"backend=kernel runs W4A4 with per-channel weight scales; {folder} is "
                                f"W{quant.w_bits}A{quant.a_bits} (group size {quant.w_group_size})")

        use_kernels(model)
    model.eval()
    return model


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved beside a quantized checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # a tokenizer mapped to shipped code, or unreadable files
        raise PipelineError(f"{folder}: its tokenizer could not be loaded ({str(exc).splitlines()[0][:160]}); "
                            "remote code is never run") from None
