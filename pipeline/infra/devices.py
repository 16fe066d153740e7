"""Where and in what precision a stage computes: ``device`` (auto | cpu | cuda | cuda:N) and
``model.dtype`` (auto | bfloat16 | float16 | float32 | float64), checked up front in one line each.

Fusion math is float64 per tensor on the chosen device whatever the compute dtype (DESIGN §1); the
compute dtype is what the model's weights are stored in and its forward runs in.
"""
from __future__ import annotations

import functools
from typing import Callable
from pathlib import Path

import torch

from .errors import PipelineError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None, what: str = "device") -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises PipelineError (one line) for an unknown name, or a CUDA device this host does not have.
    """
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PipelineError(f"{what}={name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise PipelineError(f"{what}={name}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise PipelineError(f"{what}={name}: this host has no usable CUDA GPU (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'}); use {what}=cpu or {what}=auto")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise PipelineError(f"{what}={name}: this host has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def auto_dtype(device: torch.device) -> torch.dtype:
    """``model.dtype=auto``: bfloat16 on a GPU that has it (else float16), bfloat16 on a CPU that
    multiplies it natively (AMX or AVX-512 BF16: ~3x a float32 forward here), float32 on other CPUs
    (where bfloat16 matmuls are emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str | None, what: str = "model.dtype", device: torch.device | None = None) -> torch.dtype:
    """The compute dtype named ``name`` (default float32); ``auto`` is ``auto_dtype(device)`` (``device``
    default: ``resolve_device("auto")``). Stages see a concrete name: ``config.stage_main`` resolves
    ``auto`` against the run's ``device`` before the stage starts."""
    name = "float32" if name is None else str(name)
    if name == "auto":
        return auto_dtype(resolve_device("auto") if device is None else device)
    if name not in DTYPES:
        raise PipelineError(f"{what}={name}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_dtype(device: torch.device, dtype: torch.dtype, what: str = "model.dtype") -> None:
    """Refuse (one line) a compute dtype the device cannot run a matmul in (e.g. bfloat16 before sm_80,
    float64 tensor ops on a GPU are slow but exist, so they pass)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PipelineError(f"{what}=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                            "use float16 or float32")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError as exc:
        name = dtype_name(dtype)
        raise PipelineError(f"{what}={name} cannot compute on {device} ({str(exc).splitlines()[0][:120]})") from None


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 tiles or AVX-512 BF16), read from
    ``/proc/cpuinfo`` (False where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def setup(device_name: str | None, dtype_name: str | None) -> tuple[torch.device, torch.dtype]:
    """Resolve and check ``device`` and ``model.dtype`` together (what every stage calls first)."""
    device = resolve_device(device_name)
    return device, model_dtype(dtype_name, device)


def model_dtype(dtype_name: str | None, device: torch.device) -> torch.dtype:
    """``model.dtype`` on ``device`` (``auto`` resolved for it), refused where ``device`` cannot compute
    it: ``setup``'s second half, for a stage that picks its device another way (rotate: train.device)."""
    dtype = resolve_dtype(dtype_name, device=device)
    check_dtype(device, dtype)
    return dtype


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's ``MemAvailable`` for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


STREAM_SETTINGS = ("auto", True, False)


def choose_stream(setting, what: str, nbytes: Callable[[], int], device: torch.device, share: float) -> bool:
    """Whether a stage streams its decoder layers: ``setting`` true/false, or ``auto``: when the
    ``nbytes()`` it would load exceed ``share`` of the free memory of ``device`` (called only then)."""
    if setting not in STREAM_SETTINGS:
        raise PipelineError(f"{what}={setting!r}: choose true, false or auto")
    if setting != "auto":
        return bool(setting)
    return nbytes() > share * free_memory(device)
