"""A tiny `dvc repro` of the whole pipeline on tiny_llama, in a temp copy of the repo, logging to a
real ``mlflow server``; the runs are read back through the REST API and by notebooks/compare.ipynb."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT
from pipeline.infra.config import write_params

from mlflow_server import mlflow_server, search_runs
from stage_runner import python_shim

COPY = ["pipeline", "stages", "conf", "notebooks", "cuda_ext", "dvc.yaml", ".dvc/config", ".dvc/plots", ".dvcignore",
        "pyproject.toml", "metrics/cells/README.md", "metrics/seeds/README.md"]
TINY = ["model=tiny_llama", "train.windows=4", "train.seqlen=64", "train.steps=2", "train.batch_size=2",
        "train.checkpoint_every=1", "calib.stats_windows=2", "eval.seqlen=128", "eval.max_windows=2",
        "eval.limit=2", "eval.tasks=[arc_easy,piqa,hellaswag]", "rank_sweep.ranks=[0,full]",
        "rank_sweep.max_windows=1", "+rank_sweep.variants.respinquant=layerwise",
        "+rank_sweep.variants.respinquant_chained=layerwise", "bench.m=[1,3]", "bench.layer_m=[8]", "bench.llama3_8b=false",
        "bench.min_runs=1", "bench.max_seconds=0", "bench.generate_batch=[1]", "bench.generate_prompt=8",
        "bench.generate_new_tokens=2", "bench.transition_rank=8", "report.seeds=[0,1]",
        # six of the seven default variants: every stage and every kind of variant (no rotation, Hadamard, trained
        # global, per-layer, both low-rank ones) once; fp16 only repeats rtn's stages
        "~variants.fp16", "global_variants=[rtn,quarot,spinquant]"]
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


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
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else:
            shutil.copy2(src, dst)
    write_params(repo / "params.yaml", TINY)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    # DVC runs each stage as `python stages/<stage>.py ...`: the shim first on PATH forks it from preloaded
    # imports (tests/stage_runner.py), the same script, argv, environment and streams, ~6 s less per stage
    with mlflow_server(server_dir) as url, python_shim(tmp_path / "shim") as shim:
        env = {**os.environ, **GIT_ID, "PATH": os.pathsep.join([str(shim), str(Path(sys.executable).parent),
                                                                os.environ["PATH"]]),
               "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(repo)}
        env.pop("RSQ_PIPELINE_RUN", None)
        _run(["git", "init", "-q"], repo, env)
        _run(["git", "add", "-A"], repo, env)
        _run(["git", "commit", "-q", "-m", "tiny"], repo, env)
        commit = _run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
        first = _run(["dvc", "repro"], repo, env)
        assert "skipping hellaswag" in first.stdout + first.stderr  # no file, offline: one line, not an error
        _check_outputs(repo)

        second = _run(["dvc", "repro"], repo, env)
        assert "didn't change, skipping" in second.stdout or "is cached" in second.stdout
        assert "Running stage" not in second.stdout
        shown = _run(["dvc", "metrics", "show", "--json"], repo, env).stdout
        assert "wikitext2_ppl" in shown and "zeroshot_avg" in shown
        plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo, env).stdout)
        assert not plots.get("errors"), plots["errors"]  # every plot's files exist and parse
        for plot in ("ppl_per_method", "zeroshot_per_method", "ppl_vs_rank", "train_loss", "outliers_kurtosis"):
            assert plots["data"][plot], plot

        runs = search_runs(url, "respinquant")
        _check_runs(repo, runs, commit)
        _run_notebook(repo, url)

        # a second seed of spinquant (pipeline.tools.seed_runs), then the report with both seeds
        seeded = _run([sys.executable, "-m", "pipeline.tools.seed_runs", "--seeds", "1", "--variants", "spinquant", *TINY],
                      repo, env)
        assert "seed 1 [4/4] eval variant=spinquant" in seeded.stdout
        assert (repo / "metrics" / "seeds" / "seed1" / "eval_windows" / "spinquant.json").is_file()
        assert (repo / "runs" / "seeds" / "seed1" / "params.yaml").is_file()
        seed_runs = [r for r in search_runs(url, "respinquant") if r["tags"].get("seed") == "1"]
        assert sorted(r["tags"]["stage"] for r in seed_runs) == ["calibrate", "eval", "fuse", "rotate_global"]
        _run(["dvc", "repro", "-f", "-s", "report"], repo, env)
        _check_seeded_report(repo)


def _check_seeded_report(repo: Path) -> None:
    import csv

    rows = {r["variant"]: r for r in csv.DictReader((repo / "metrics" / "report" / "methods.csv").open())}
    assert rows["spinquant"]["seeds"] == "2" and float(rows["spinquant"]["wikitext2_ppl_std"]) > 0
    assert rows["layerwise"]["seeds"] == "1" and rows["layerwise"]["wikitext2_ppl_std"] == ""
    assert rows["spinquant"]["ratio_vs_spinquant"] == ""  # no ratio to itself
    assert rows["rtn"]["ratio_vs_spinquant"] == ""  # rtn weights: spinquant's row has GPTQ weights, no reference
    # layerwise has seed 0 only: a ratio to spinquant on their one common seed, but no interval and no verdict
    # (tests/test_seed_stats.py checks the verdict of two seeds)
    layerwise = rows["layerwise"]
    assert float(layerwise["ratio_vs_spinquant"]) > 0 and layerwise["significant_vs_spinquant"] == ""
    assert layerwise["ratio_vs_spinquant_ci_low"] == layerwise["ratio_vs_spinquant_ci_high"] == ""
    results = (repo / "results.md").read_text()
    assert "± " in results and "(1 seed)" in results


def _check_outputs(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for variant in params["variants"]:
        result = json.loads((repo / "metrics" / "eval" / f"{variant}.json").read_text())
        assert result["wikitext2_windows"] == 2 and result["wikitext2_seqlen"] == 128
        assert 1.0 < result["wikitext2_ppl"] < 1e6
        assert result["zeroshot_tasks"] == ["arc_easy", "piqa"] and result["zeroshot_skipped"] == ["hellaswag"]
        assert result["zeroshot_limit"] == 2 and 0 <= result["zeroshot_avg"] <= 1
        assert (repo / "artifacts" / "fused" / variant / "model.safetensors.index.json").is_file()
    approx = json.loads((repo / "metrics" / "approx" / "respinquant.json").read_text())
    assert approx["rank"] == "32" and approx["approx_mean_rank"] == 32 and approx["approx_max_orth_error"] < 1e-12
    ckpt = json.loads((repo / "artifacts" / "fused" / "respinquant" / "rsq_config.json").read_text())
    assert ckpt["online"]["transitions"] == "low_rank"
    # shared training: layerwise starts from spinquant's global set, respinquant approximates layerwise's
    assert not (repo / "artifacts" / "rotations" / "layerwise" / "global.safetensors").exists()
    assert not (repo / "artifacts" / "rotations" / "respinquant" / "layerwise.safetensors").exists()
    assert set(params["variants"]) == {"rtn", "quarot", "spinquant", "layerwise", "respinquant", "respinquant_chained"}
    for name in ("respinquant", "respinquant_chained"):  # both variants against the rank
        sweep = (repo / "metrics" / "rank_sweep" / f"{name}.csv").read_text().splitlines()
        assert sweep[0].startswith("rank,mean_rank") and [line.split(",")[0] for line in sweep[1:]] == ["0", "full"]
    for name in params["variants"]:
        windows = json.loads((repo / "metrics" / "eval_windows" / f"{name}.json").read_text())
        assert len(windows["window_nll"]) == 2 and windows["seed"] == 0
    results = (repo / "results.md").read_text()
    for variant in params["variants"]:
        assert f"| {variant} |" in results
    assert "zero-shot avg" in results and "against the subspace rank" in results
    bench = json.loads((repo / "metrics" / "bench.json").read_text())
    assert bench["backend"] == "cpu" and {r["op"] for r in bench["rows"]} >= {"linear_w4a4", "decoder_layer_w4a4"}
    table = (repo / "metrics" / "report" / "methods.csv").read_text().splitlines()
    assert table[0] == ("variant,method,quant,weights,seeds,wikitext2_ppl,wikitext2_ppl_mean,wikitext2_ppl_std,"
                        "ratio_vs_spinquant,ratio_vs_spinquant_ci_low,ratio_vs_spinquant_ci_high,significant_vs_spinquant,"
                        "ratio_vs_layerwise,ratio_vs_layerwise_ci_low,ratio_vs_layerwise_ci_high,significant_vs_layerwise,"
                        "arc_easy,piqa,zeroshot_avg")
    assert len(table) == 1 + len(params["variants"])
    assert ckpt["method"]["chained"] is False
    chained = json.loads((repo / "artifacts" / "fused" / "respinquant_chained" / "rsq_config.json").read_text())
    assert chained["method"]["chained"] is True and chained["online"]["transitions"] == "low_rank"


def _check_runs(repo: Path, runs: list[dict], commit: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stages = sorted(r["tags"]["stage"] for r in runs)
    assert stages.count("calibrate") == 1 and stages.count("eval") == len(params["variants"])
    assert stages.count("rotate_global") == len(params["global_variants"])
    assert stages.count("approximate") == len(params["approx_variants"])
    assert stages.count("rank_sweep") == 2 and stages.count("report") == 1 and stages.count("bench") == 1
    assert {r["tags"]["pipeline_run"] for r in runs} == {r["tags"]["pipeline_run"] for r in runs[:1]}
    assert runs[0]["tags"]["pipeline_run"].startswith(commit[:8] + "-")
    for run in runs:
        assert run["tags"]["git_commit"] == commit and run["tags"]["model"] == "tiny_llama"
        if run["tags"]["stage"] not in ("calibrate", "report", "bench"):
            assert run["tags"]["method"] and run["tags"]["quant"] and run["tags"]["variant"]
    evals = {r["tags"]["variant"]: r for r in runs if r["tags"]["stage"] == "eval"}
    assert set(evals) == set(params["variants"])
    assert evals["respinquant"]["tags"]["weights"] == "gptq" and evals["rtn"]["tags"]["quant"] == "w4a4kv4"
    for run in evals.values():
        assert {"wikitext2_ppl", "zeroshot_avg", "arc_easy", "piqa"} <= set(run["metrics"])
        assert run["params"]["model.name"] == "tiny_llama"


def _run_notebook(repo: Path, url: str) -> None:
    import nbformat
    from nbclient import NotebookClient

    path = repo / "notebooks" / "compare.ipynb"
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MPLBACKEND")}
    os.environ.update({"MLFLOW_TRACKING_URI": url, "MPLBACKEND": "Agg"})
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    text = "\n".join(str(o.get("data", o.get("text", ""))) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for variant in params["variants"]:
        assert variant in text
    assert "zeroshot_avg" in text and "wikitext2_ppl" in text and "mean_rank" in text
