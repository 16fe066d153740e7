"""Artifacts: the same tensors and metadata saved by two processes are the same bytes (DVC hashes them)."""
from __future__ import annotations

import subprocess
import sys

import torch

from conftest import ROOT
from pipeline.infra.artifacts import load_tensors

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
