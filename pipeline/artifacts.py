"""Artifacts: safetensors only, atomic writes, metadata naming the model and config that made them."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` (a file or a folder of files from mkstemp/mkdtemp, mode 0600/0700) the usual
    permissions, then rename it onto ``path``, replacing what was there."""
    mask = _umask()
    for p in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def canonical_safetensors(raw: bytes) -> bytes:
    """``raw`` safetensors bytes with the JSON header's keys sorted (metadata included).

    safetensors writes its metadata map in no fixed order, so two runs that save the same tensors
    wrote different bytes, and DVC took an unchanged artifact for a changed one. The data section is
    untouched (its offsets are relative to it); the header is padded to 8 bytes as safetensors does.
    """
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` with string ``metadata`` (must include ``fingerprint``)."""
    if "fingerprint" not in metadata:
        raise ValueError("artifact metadata must name the model fingerprint")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    raw = save(flat, metadata={k: str(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_safetensors(raw))


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run the stage that makes it first (dvc repro)")
    return path


def _check_fingerprint(path: Path, metadata: dict[str, str], fingerprint: str | None) -> None:
    made_for = metadata.get("fingerprint")
    if fingerprint is not None and made_for != fingerprint:
        raise PipelineError(
            f"{path} was made for model {metadata.get('model', '?')} (fingerprint {made_for}), "
            f"not this one ({fingerprint}): rerun its stage for this model"
        )


def load_tensors(path: str | Path, fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors artifact; refuse one made for another model (``fingerprint`` mismatch)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    _check_fingerprint(path, metadata, fingerprint)
    return tensors, metadata


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Short sha256 of the tensors' bytes (and shapes): tells two runs' inputs apart."""
    return tensor_digest_of(tensors)


def tensor_digest_of(tensors: Iterable[torch.Tensor]) -> str:
    """``tensor_digest`` of an iterable, read one tensor at a time (a lazy set stays on disk)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tensor_shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of ``tensors[key]`` without reading it when ``tensors`` is a ``LazyTensors``."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(key)
    return tuple(tensors[key].shape)


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping whose tensors are read (memory-mapped) on access.

    A per-layer rotation set of Llama-3-8B is 129 x 64 MiB: streamed stages read one matrix when they
    need it instead of the whole file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def open_tensors(path: str | Path, fingerprint: str | None = None) -> tuple[LazyTensors, dict[str, str]]:
    """``load_tensors`` that reads no tensor yet: a ``LazyTensors`` mapping and the metadata."""
    path = _existing(path)
    try:
        lazy = LazyTensors(path)
        metadata = dict(lazy._file.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    _check_fingerprint(path, metadata, fingerprint)
    return lazy, metadata


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
