"""Artifacts: safetensors only, atomic writes, metadata naming the model and config that made them."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PipelineError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` with string ``metadata`` (must include ``fingerprint``)."""
    if "fingerprint" not in metadata:
        raise ValueError("artifact metadata must name the model fingerprint")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def load_tensors(path: str | Path, fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors artifact; refuse one made for another model (``fingerprint`` mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run the stage that makes it first (dvc repro)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    made_for = metadata.get("fingerprint")
    if fingerprint is not None and made_for != fingerprint:
        raise PipelineError(
            f"{path} was made for model {metadata.get('model', '?')} (fingerprint {made_for}), "
            f"not this one ({fingerprint}): rerun its stage for this model"
        )
    return tensors, metadata


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
