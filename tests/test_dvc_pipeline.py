"""A tiny `dvc repro` of the whole pipeline on tiny_llama, in a temp copy of the repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT
from pipeline.config import write_params

COPY = ["pipeline", "stages", "conf", "dvc.yaml", ".dvc/config", ".dvcignore", "pyproject.toml"]
TINY = ["model=tiny_llama", "train.windows=4", "train.seqlen=64", "train.steps=2", "train.batch_size=2",
        "train.checkpoint_every=1", "calib.stats_windows=2", "eval.seqlen=128", "eval.max_windows=2"]


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_dvc_repro_tiny(tmp_path):
    repo = tmp_path / "repo"
    for rel in COPY:
        src, dst = ROOT / rel, repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(repo / "params.yaml", TINY)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PYTHONPATH": str(repo)}
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "repro"], repo, env)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for variant in params["variants"]:
        result = json.loads((repo / "metrics" / "eval" / f"{variant}.json").read_text())
        assert result["wikitext2_windows"] == 2 and result["wikitext2_seqlen"] == 128
        assert 1.0 < result["wikitext2_ppl"] < 1e6
        assert (repo / "artifacts" / "fused" / variant / "model.safetensors").is_file()
    approx = json.loads((repo / "metrics" / "approx" / "respinquant.json").read_text())
    assert approx["rank"] == "32" and approx["approx_mean_rank"] == 32 and approx["approx_max_orth_error"] < 1e-12
    ckpt = json.loads((repo / "artifacts" / "fused" / "respinquant" / "rsq_config.json").read_text())
    assert ckpt["online"]["transitions"] == "low_rank"
    # shared training: layerwise starts from spinquant's global set, respinquant approximates layerwise's
    assert not (repo / "artifacts" / "rotations" / "layerwise" / "global.safetensors").exists()
    assert not (repo / "artifacts" / "rotations" / "respinquant" / "layerwise.safetensors").exists()
    fp = json.loads((repo / "metrics" / "eval" / "fp16.json").read_text())["wikitext2_ppl"]
    rtn = json.loads((repo / "metrics" / "eval" / "rtn.json").read_text())["wikitext2_ppl"]
    assert fp != rtn  # quantization really happened

    second = _run(["dvc", "repro"], repo, env)
    assert "didn't change, skipping" in second.stdout or "is cached" in second.stdout
    assert "Running stage" not in second.stdout
    shown = _run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert "wikitext2_ppl" in shown

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["respinquant"])
    stages = sorted(runs["tags.stage"].tolist())
    assert stages.count("calibrate") == 1 and stages.count("eval") == len(params["variants"])
    assert stages.count("rotate_global") == len(params["global_variants"]) and stages.count("approximate") == len(params["approx_variants"])
    assert "params.model.name" in runs.columns and "metrics.wikitext2_ppl" in runs.columns
