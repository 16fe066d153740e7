"""Artifacts: safetensors only, atomic writes, metadata naming the model and config that made them."""
from __future__ import annotations

import csv
import ctypes
import errno
import fcntl
import hashlib
import json
import math
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


def _renameat2():
    """glibc's ``renameat2`` (Linux >= 3.15, glibc >= 2.28), or None where it is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock for publishing output ``path``: ``flock`` on its parent folder (no lock file
    to leave in DVC's outputs), so two stages writing the same output never interleave their renames."""
    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` (a file or a folder of files from mkstemp/mkdtemp, mode 0600/0700) the usual
    permissions, then move it onto ``path``, replacing what was there, under ``path``'s lock.

    A folder is swapped in with one atomic ``renameat2(RENAME_EXCHANGE)``, so ``path`` is never
    missing, not even for a reader racing the swap (a system without it falls back to two renames,
    still under the lock); the old folder is then removed from where ``tmp`` was.
    """
    mask = _umask()
    for p in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    with output_lock(path):
        if path.is_dir() and not path.is_symlink():
            if _exchange(tmp, path):
                shutil.rmtree(tmp)  # tmp now holds the old folder
                return
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: Path, prefix: str) -> None:
    """Remove what killed runs left in ``folder`` under ``prefix``: temps named ``<prefix><pid>-*``
    whose process is gone (staging folders, ``.tmp`` files, spill and parked folders), and an
    interrupted swap's ``.old`` folder."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        name = p.name
        if not name.startswith(prefix):
            continue
        pid, sep, _ = name[len(prefix):].partition("-")
        stale = (sep and pid.isdigit() and not _alive(int(pid))) or name == f"{prefix}old"
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def make_folder(folder: Path) -> None:
    """``folder`` and its parents made if missing; one line where something that is not a folder is in
    the way (a file, a symlink to itself or to nowhere, a symlink loop)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PipelineError(f"{folder} exists and is not a folder (a file, or a symlink that leads nowhere "
                            "or to itself): remove it or choose another path") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PipelineError(f"{folder}: {exc.strerror} on its path (a symlink loop or a file where a folder "
                                "should be)") from None
        raise


def private_tempdir(folder: str | Path, prefix: str) -> str:
    """``mkdtemp`` in ``folder`` named ``<prefix><pid>-*`` (mode 0700), after the leftovers of dead
    runs under ``prefix`` are removed (``clean_leftovers``)."""
    folder = Path(folder)
    make_folder(folder)
    clean_leftovers(folder, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder)


@contextmanager
def scratch_dir(folder: str | Path, prefix: str) -> Iterator[Path]:
    """A private temp folder (``private_tempdir``) removed when the block ends, also on error; one a
    killed run leaves is removed by the next run that uses the same ``prefix`` in ``folder``."""
    tmp = Path(private_tempdir(folder, prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = Path(private_tempdir(path.parent, f".{path.name}."))
    try:
        yield tmp
        publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    make_folder(path.parent)
    clean_leftovers(path.parent, f".{path.name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
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


FINITE_CHUNK = 1 << 24  # elements checked at a time: no bool copy of a whole 128256 x 4096 table


def is_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (always, for integer tensors)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Refuse (one line naming the first bad tensor) tensors holding NaN or inf before they are written."""
    for key, t in tensors.items():
        if not is_finite(t):
            raise PipelineError(f"{key} holds NaN or inf values: {where} is not written (are the model's "
                                "weights, the rotations or the training settings non-finite?)")


def _check_finite_values(value, where: str | Path, key: str = "") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise PipelineError(f"{key or 'a value'} is {value}: {where} is not written (non-finite result)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite_values(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_values(v, where, f"{key}[{i}]")


DIGEST_KEY = "sha256"  # metadata key: JSON {tensor name: sha256 of its bytes, "__metadata__": sha256 of the rest}


def _bytes_sha256(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()


def _metadata_sha256(metadata: Mapping[str, str]) -> str:
    rest = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` with string ``metadata`` (must include ``fingerprint``); refuses
    non-finite tensors (one line). The metadata also records the sha256 of every tensor's bytes and of
    the rest of the metadata (``DIGEST_KEY``): ``load_tensors`` / ``open_tensors`` check them on read,
    so a corrupted or edited artifact is refused instead of fused (and then certified by the checkpoint's
    own hashes)."""
    if "fingerprint" not in metadata:
        raise ValueError("artifact metadata must name the model fingerprint")
    check_finite(tensors, path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in metadata.items() if k != DIGEST_KEY}
    digests = {k: _bytes_sha256(v) for k, v in flat.items()}
    meta[DIGEST_KEY] = json.dumps({**digests, "__metadata__": _metadata_sha256(meta)}, sort_keys=True)
    raw = save(flat, metadata=meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_safetensors(raw))


def recorded_digests(path: Path, metadata: Mapping[str, str]) -> dict[str, str]:
    """The per-tensor digests ``save_tensors`` recorded, after checking the metadata's own digest;
    one line if they are missing (a file not written by this pipeline, or by a version before digests)
    or if the metadata was edited."""
    try:
        digests = json.loads(metadata[DIGEST_KEY])
        assert isinstance(digests, dict)
    except (KeyError, ValueError, AssertionError):
        raise PipelineError(f"{path} carries no digest (not written by this version of the pipeline): "
                            "rerun the stage that makes it") from None
    if digests.get("__metadata__") != _metadata_sha256(metadata):
        raise PipelineError(f"{path} failed its digest check: its metadata was changed after it was written; "
                            "rerun the stage that makes it")
    return digests


def check_digest(path: Path, digests: Mapping[str, str], key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (read from ``path`` as ``key``) if its bytes match the recorded digest, else one line."""
    if digests.get(key) != _bytes_sha256(tensor):
        raise PipelineError(f"{path} failed its digest check: tensor {key} is not the one written "
                            "(corrupted or edited); rerun the stage that makes it")
    return tensor


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


def load_tensors(path: str | Path, fingerprint: str | None = None,
                 digests: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors artifact of ``save_tensors``; refuse one whose digests fail (corrupted or
    edited) or that was made for another model (``fingerprint`` mismatch), in one line.
    ``digests=False`` is for files verified otherwise (a checkpoint shard: its whole-file sha256 is
    in the checkpoint's index)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if digests:
        recorded = recorded_digests(path, metadata)
        if set(recorded) - {"__metadata__"} != set(tensors):
            raise PipelineError(f"{path} failed its digest check: its tensors are not the ones written; "
                                "rerun the stage that makes it")
        for key, tensor in tensors.items():
            check_digest(path, recorded, key, tensor)
    metadata.pop(DIGEST_KEY, None)
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


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file read tensor by tensor with plain file reads, not a memory map.

    A memory-mapped file's pages count in the reading process's resident set for as long as the file
    stays mapped, so streaming a 16 GB model through ``safe_open`` shows 16 GB of RSS even though
    only one layer is in use. Reading each tensor into its own buffer keeps RSS to what is held (the
    kernel's page cache still serves repeated reads).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= 100_000_000:
                    raise ValueError(f"header length {n} out of range")
                header = json.loads(f.read(n))
            self.metadata = dict(header.pop("__metadata__", None) or {})
            self.entries = header
            self.base = 8 + n
            size = self.path.stat().st_size
            for name, info in header.items():
                start, end = info["data_offsets"]
                if info["dtype"] not in SAFETENSORS_DTYPES or not 0 <= start <= end <= size - self.base:
                    raise ValueError(f"bad entry {name}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"{self.path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        info = self.entries[key]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with self.path.open("rb") as f:
            f.seek(self.base + start)
            if f.readinto(buf.numpy()) != end - start:
                raise PipelineError(f"{self.path} is truncated: {key} lies past its end")
        return buf.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping whose tensors are read on access.

    A per-layer rotation set of Llama-3-8B is 129 x 64 MiB: streamed stages read one matrix when they
    need it instead of the whole file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SafetensorsFile(path)
        self._keys = self._file.keys()
        self._digests = recorded_digests(path, self._file.metadata)
        if set(self._digests) - {"__metadata__"} != set(self._keys):
            raise PipelineError(f"{path} failed its digest check: its tensors are not the ones written; "
                                "rerun the stage that makes it")

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor, read now and checked against its recorded digest."""
        if key not in self._keys:
            raise KeyError(key)
        return check_digest(self.path, self._digests, key, self._file.get(key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file.shape(key)

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata as saved, less the digests (checked already)."""
        return {k: v for k, v in self._file.metadata.items() if k != DIGEST_KEY}


def open_tensors(path: str | Path, fingerprint: str | None = None) -> tuple[LazyTensors, dict[str, str]]:
    """``load_tensors`` that reads no tensor yet: a ``LazyTensors`` mapping and the metadata."""
    path = _existing(path)
    lazy = LazyTensors(path)
    _check_fingerprint(path, lazy.metadata, fingerprint)
    return lazy, lazy.metadata


def write_json(path: str | Path, data: dict) -> None:
    """Atomically write ``data`` as sorted JSON; a NaN or inf number in it is refused (one line)."""
    _check_finite_values(data, path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    _check_finite_values(rows, path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
