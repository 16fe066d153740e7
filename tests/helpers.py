"""Helpers shared by the test modules: running a stage script, tiny float64 models, rotation sets and
specs, a prepared (fused, quantized) model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from conftest import ROOT, SHARED_DATA, model_cfg
from stage_runner import run_script
from pipeline.infra.config import CONF_DIR, resolve_auto_dtype, select_variant
from pipeline.methods import MethodSpec, make_rotations, prepare_base, prepare_model
from pipeline.model.adapters import adapter_for
from pipeline.model.load import load_model, model_fingerprint
from pipeline.quant.quantizers import QuantSpec
from pipeline.rotation.cayley import orthonormalize
from pipeline.rotation.subspace import ApproxSpec, approximate_set
from pipeline.train.trainable import TrainableRotations, parametrize_rotations


# --- stage scripts run as a user runs them ---
_MLFLOW_TEMPLATE: list[Path] = []


def mlflow_uri(tmp_path) -> str:
    """A sqlite MLflow store of the test's own (``tmp_path/mlflow.db``), copied from an empty store made
    once per session: a fresh store costs ~2 s of schema migrations, paid by every stage test before.
    (tests/test_publish.py still creates two fresh stores at once, the case that needs it.)"""
    db = Path(tmp_path) / "mlflow.db"
    if not db.exists():
        if not _MLFLOW_TEMPLATE:
            folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
            MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates the schema
            _MLFLOW_TEMPLATE.append(folder / "mlflow.db")
        shutil.copyfile(_MLFLOW_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def run_stage(tmp_path, script: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "stages" / script),
            f"paths.artifacts={tmp_path / 'a'}", f"paths.metrics={tmp_path / 'm'}", *overrides]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "RSQ_DATA_DIR": str(SHARED_DATA), "MLFLOW_TRACKING_URI": mlflow_uri(tmp_path),
                **(env or {})}
    return run_script(Path(args[1]), args[2:], full_env, Path(tmp_path), timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and expected in lines[-1], proc.stderr


# --- float64 tiny models and their logits ---
MODELS = ["tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_no_hadamard", "tiny_qwen3", "tiny_llama32", "tiny_phi3",
          "tiny_qwen3_moe", "tiny_olmoe", "tiny_mixtral"]


def f64_model(name: str):
    model, _ = load_model(model_cfg(name))
    return model.double()


def model_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_per_layer_set(model, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random orthogonal A_i, B_i (so every transition is far from I) and R2 per layer."""
    dims = adapter_for(model).dims(model)
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: orthonormalize(torch.randn(n, n, generator=g, dtype=torch.float64))  # noqa: E731
    rotations = {f"A.{i}": rand(dims.hidden) for i in range(dims.n_layers + 1)}
    rotations.update({f"B.{i}": rand(dims.hidden) for i in range(dims.n_layers)})
    rotations.update({f"R2.{i}": rand(dims.head_dim) for i in range(dims.n_layers)})
    return rotations


# --- rotation methods and sets ---
LAYERWISE = MethodSpec(name="layerwise", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True, per_layer=True)
RESPIN = MethodSpec(name="respinquant_chained", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True,
                    per_layer=True, transition="low_rank", chained=True)


def low_rank_subspace(model, rotations, rank, chained: bool = True) -> dict[str, torch.Tensor]:
    dims = adapter_for(model).dims(model)
    bases = {k: orthonormalize(v.double()) for k, v in rotations.items() if not k.startswith("R2.")}
    return approximate_set(bases, dims.n_layers, ApproxSpec(rank=rank), progress=False, chained=chained)[0]


SPIN = MethodSpec(name="spinquant", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True,
                  train=True)
LAYERWISE_TRAINED = MethodSpec(name="layerwise", r1="random_hadamard", r2="random_hadamard", online_r3=True,
                               online_r4=True, per_layer=True, train=True)


A4 = QuantSpec(a_bits=4, kv_bits=4)


def training_setup(method: MethodSpec, seed: int = 0, quant: QuantSpec = A4, outliers: bool = False):
    model, _ = load_model(model_cfg("tiny_llama"))
    if outliers:  # like real LLMs: a few massive residual channels, and confident predictions
        with torch.no_grad():
            model.model.embed_tokens.weight[:, :4] *= 20
            model.lm_head.weight.mul_(5)
    adapter = prepare_base(model, method, quant)
    rotations = TrainableRotations(make_rotations(method, model))
    parametrize_rotations(model, adapter, rotations)
    windows = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(seed))
    return model, rotations, windows


QUAROT = MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True)
W4A4 = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)


def prepared_model(name: str, method: MethodSpec, quant: QuantSpec, rank=None):
    model, tok = load_model(model_cfg(name))
    fingerprint = model_fingerprint(model)
    if method.per_layer:
        rotations = random_per_layer_set(load_model(model_cfg(name))[0].double(), seed=3)
    else:
        rotations = make_rotations(method, model)
    sub = low_rank_subspace(model, rotations, rank) if rank is not None else None
    calib = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    prepare_model(model, method, rotations, quant, sub, calib)
    return model, tok, fingerprint


# --- what a hand-run stage names its inputs and outputs ---
def hand_run(tmp_path, *overrides: str):
    """``(name, cfg)`` of a hand run with ``overrides`` under ``run_stage``'s folders: the output name
    and the config whose ``sources`` name its rotation sets and subspace, and whose paths are the stage's."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.artifacts={tmp_path / 'a'}",
                                                       f"paths.metrics={tmp_path / 'm'}", *overrides])
    resolve_auto_dtype(cfg)
    return select_variant(cfg)
