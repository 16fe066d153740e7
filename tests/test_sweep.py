"""The acceptance-table CLIs on a tiny model: rows and columns, and bad input as one line."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import torch

from conftest import ROOT, SHARED_DATA, model_cfg
from pipeline.infra import paths
from pipeline.infra.artifacts import save_tensors
from pipeline.infra.config import compose_pipeline
from pipeline.infra.settings import SETTING_KEY, calib_setting, record
from pipeline.methods import MethodSpec, make_rotations
from pipeline.model.load import load_model, model_fingerprint

TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=1"]


def _cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "RSQ_DATA_DIR": str(SHARED_DATA), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _sets(tmp_path) -> list[str]:
    model, _ = load_model(model_cfg("tiny_llama"))
    meta = {"fingerprint": model_fingerprint(model)}
    quarot = MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard")
    layerwise = MethodSpec(name="layerwise", r1="random_hadamard", r2="random_hadamard", per_layer=True)
    per_layer = make_rotations(layerwise, model)
    g = torch.Generator().manual_seed(0)
    for k in per_layer:  # move the bases apart so the transitions are not the identity
        if k[:2] in ("A.", "B."):
            per_layer[k] = torch.linalg.qr(per_layer[k] + 0.1 * torch.randn(per_layer[k].shape, generator=g, dtype=per_layer[k].dtype))[0]
    save_tensors(tmp_path / "q.safetensors", make_rotations(quarot, model), meta)
    save_tensors(tmp_path / "l.safetensors", per_layer, meta)
    return ["--set", f"quarot={tmp_path / 'q.safetensors'}", "--set", f"layerwise={tmp_path / 'l.safetensors'}"]


def test_sweep_writes_one_row_per_method_rank_and_quantizer(tmp_path):
    out = tmp_path / "table.csv"
    proc = _cli("pipeline.tools.sweep", "--quant", "w4a4kv4", *_sets(tmp_path), "--ranks", "0", "full", "adaptive",
                "--weights", "rtn", "--out", str(out), *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("rtn", ""), ("quarot", ""), ("layerwise", ""), ("respinquant", "0"), ("respinquant", "full"),
        ("respinquant", "adaptive0.9"), ("respinquant_chained", "0"), ("respinquant_chained", "full"),
        ("respinquant_chained", "adaptive0.9")]
    assert all(float(r["wikitext2_ppl"]) > 1 and r["weights"] == "rtn" for r in rows)
    assert float(rows[4]["mean_rank"]) == 192 and float(rows[4]["mean_rel_error"]) < 1e-9
    # r = 0: the paper's variant keeps the trained bases (a basis mismatch), the chained one fuses A_0
    assert rows[3]["wikitext2_ppl"] != rows[6]["wikitext2_ppl"]
    assert float(rows[3]["mean_basis_error"]) > 0.01 and float(rows[7]["mean_basis_error"]) < 1e-9


def test_sweep_bad_input_is_one_line(tmp_path):
    for args, message in [(["--set", "foo"], "--set foo: give quarot=PATH"),
                          (["--quant", "w5a5"], "--quant w5a5: no conf/quant/w5a5.yaml"),
                          (["--set", f"layerwise={tmp_path / 'none.safetensors'}"], "does not exist")]:
        proc = _cli("pipeline.tools.sweep", *args, "--out", str(tmp_path / "t.csv"), *TINY, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "t.csv").exists()


def test_sweep_streamed_gives_the_whole_model_rows(tmp_path):
    """``--stream true`` (temporary streamed checkpoint, layer-sequential ppl) writes the perplexities
    of the in-memory fuse, row for row, and leaves no temporary checkpoint."""
    sets = _sets(tmp_path)
    fingerprint = model_fingerprint(load_model(model_cfg("tiny_llama"))[0])
    calib = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    cfg = compose_pipeline(["quant@variants.rtn.quant=w4a4kv4", *TINY])  # the sweep's config
    save_tensors(tmp_path / paths.calib_windows(cfg), {"windows": calib},  # GPTQ's windows, as calibrate writes them
                 {"fingerprint": fingerprint, SETTING_KEY: record(calib_setting(cfg))})
    tables = {}
    for stream in ("true", "false"):
        out = tmp_path / f"{stream}.csv"
        env_dir = tmp_path / "cache"
        proc = subprocess.run([sys.executable, "-m", "pipeline.tools.sweep", "--quant", "w4a4kv4", *sets, "--ranks", "8",
                               "--weights", "gptq", "--methods", "quarot", "respinquant", "--stream", stream,
                               "--out", str(out), *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RSQ_DATA_DIR": str(SHARED_DATA), "PYTHONPATH": str(ROOT),
                                   "RSQ_CACHE_DIR": str(env_dir)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        tables[stream] = [(r["weights"], r["method"], r["rank"], r["wikitext2_ppl"]) for r in csv.DictReader(out.open())]
    assert len(tables["true"]) == 2 and tables["true"] == tables["false"]
    assert not any((tmp_path / "cache" / "fused-tmp").iterdir())
