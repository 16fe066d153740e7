"""Data-parallel rotation training, plain and with FSDP2-sharded weights: 2 CPU ranks (torchrun, gloo)
equal one process on the same batch."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from pipeline.infra.artifacts import load_tensors
from helpers import mlflow_uri, one_line_error, run_stage

TINY = ["+model=tiny_llama", "method=spinquant", "train.windows=4", "train.seqlen=64", "train.steps=3",
        "train.batch_size=2", "train.checkpoint_every=0", "calib.stats_windows=1"]


def _run(args: list[str], cwd, env) -> None:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


STAGE = str(ROOT / "stages" / "train_rotation.py")


def _rotations(tmp_path):
    """The trained global set of the hand run (its name ends in its setting's tag: the one spinquant set)."""
    (path,) = (tmp_path / "a" / "rotations").glob("spinquant-*/global.safetensors")
    return path


def _single_process_run(tmp_path) -> tuple[dict, str, list[str], dict[str, torch.Tensor]]:
    """Calibrate, then train in one process: ``(env, stage script, common overrides, its rotations)``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RSQ_DATA_DIR": str(SHARED_DATA),
           "MLFLOW_TRACKING_URI": mlflow_uri(tmp_path), "OMP_NUM_THREADS": "1"}
    common = [f"paths.artifacts={tmp_path / 'a'}", *TINY]
    _run([sys.executable, str(ROOT / "stages" / "calibrate.py"), *common, f"paths.metrics={tmp_path / 'm'}"],
         tmp_path, env)
    _run([sys.executable, STAGE, *common, f"paths.metrics={tmp_path / 'single'}"], tmp_path, env)
    return env, STAGE, common, load_tensors(_rotations(tmp_path))[0]


def test_two_ranks_equal_single_process(tmp_path):
    env, stage, common, single = _single_process_run(tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", stage, *common,
          f"paths.metrics={tmp_path / 'ddp'}"], tmp_path, env)
    ddp, _ = load_tensors(_rotations(tmp_path))

    assert single.keys() == ddp.keys()
    moved = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert moved < 1e-4, moved
    # and training really moved the rotations away from their Hadamard start
    from pipeline.rotation.hadamard import orthogonal_hadamard

    start = orthogonal_hadamard(192, seed=0, dtype=torch.float32)
    assert (single["R1"] - start).abs().max() > 1e-3


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_fsdp2_two_ranks_equal_single_process(tmp_path, checkpointing):
    """train.fsdp=true: each of 2 gloo ranks holds half the frozen weights (FSDP2 per decoder layer),
    and the trained rotations equal one process's (also with activation checkpointing, which
    re-gathers each layer for its recomputed forward)."""
    env, stage, common, single = _single_process_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", stage,
                           *common, "train.fsdp=true", f"train.grad_checkpointing={checkpointing}",
                           f"paths.metrics={tmp_path / 'fsdp'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    fsdp, _ = load_tensors(_rotations(tmp_path))
    shards = re.findall(r"FSDP2: (\d+) decoder layers sharded over 2 ranks: ([\d.]+) MiB of parameters on rank (\d) "
                        r"\(of ([\d.]+) MiB\)", proc.stdout + proc.stderr)
    assert sorted(int(r) for _, _, r, _ in shards) == [0, 1], proc.stdout[-2000:] + proc.stderr[-2000:]
    for layers, mine, _, full in shards:
        assert int(layers) == 2 and float(mine) <= 0.55 * float(full)
    assert single.keys() == fsdp.keys()
    moved = max((single[k] - fsdp[k]).abs().max().item() for k in single)
    assert moved < 1e-4, moved


def test_fsdp_without_torchrun_is_one_line(tmp_path):
    proc = run_stage(tmp_path, "train_rotation.py", *TINY, "train.fsdp=true")
    one_line_error(proc, "error: train.fsdp=true shards the model over torchrun's ranks")
    assert not (tmp_path / "a" / "rotations").exists()
