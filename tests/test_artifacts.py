"""Artifacts: the same tensors and metadata saved by two processes are the same bytes (DVC hashes them)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pipeline.infra.artifacts import load_tensors
from pipeline.infra.errors import PipelineError

WRITE = """
import sys, torch
from pipeline.infra.artifacts import save_tensors
g = torch.Generator().manual_seed(0)
tensors = {f"t{i}": torch.randn(3, i + 1, generator=g) for i in range(6)}
save_tensors(sys.argv[1], tensors, {"fingerprint": "f", "model": "m", "method": "x", "stage": "global",
                                   "a": "1", "b": "2", "c": "3"})
"""


def test_same_artifact_same_bytes_across_processes(tmp_path):
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], cwd=ROOT, check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    tensors, meta = load_tensors(paths[0], "f")
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(tensors[f"t{i}"], torch.randn(3, i + 1, generator=g)) for i in range(6))
    assert meta == {"fingerprint": "f", "model": "m", "method": "x", "stage": "global", "a": "1", "b": "2", "c": "3"}


def _saved(tmp_path):
    from pipeline.infra.artifacts import save_tensors

    path = tmp_path / "set.safetensors"
    g = torch.Generator().manual_seed(1)
    save_tensors(path, {"R1": torch.randn(16, 16, generator=g), "R2.0": torch.randn(4, 4, generator=g)},
                 {"fingerprint": "f", "setting": '{"seed": 0}'})
    return path


def _header(raw: bytes) -> tuple[int, dict]:
    import json

    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("reader", ["load", "open"])
def test_flipped_data_bytes_fail_the_digest_check(tmp_path, reader):
    """The review's case: flipped bytes inside a rotation matrix used to be fused silently."""
    from pipeline.infra.artifacts import open_tensors

    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    n, header = _header(bytes(raw))
    start = 8 + n + header["R2.0"]["data_offsets"][0]
    raw[start + 1] ^= 0x40  # one bit of a mantissa: a value that is still finite and plausible
    path.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match=r"failed its digest check: tensor R2\.0 is not the one written"):
        if reader == "load":
            load_tensors(path, "f")
        else:
            lazy, _ = open_tensors(path, "f")
            assert torch.isfinite(lazy["R1"]).all()  # the untouched tensor reads fine
            lazy["R2.0"]


def test_edited_metadata_and_a_file_without_digests_are_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from pipeline.infra.artifacts import open_tensors

    path = _saved(tmp_path)
    raw = path.read_bytes()
    n, header = _header(raw)
    header["__metadata__"]["setting"] = '{"seed": 1}'  # relabelled: another seed's set
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    with pytest.raises(PipelineError, match="its metadata was changed after it was written"):
        load_tensors(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"R1": torch.eye(4)}, str(foreign), metadata={"fingerprint": "f"})
    for read in (load_tensors, open_tensors):
        with pytest.raises(PipelineError, match="carries no digest"):
            read(foreign)
