"""``python -m pipeline.tools.gpu.check``: the CPU run of the prepared GPU check (the same code paths, tiny
shapes), its result schema, the budget skip, bad input, the merge, and that it imports nothing the GPU
machine lacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tools.gpu import check as gpu_check, merge as gpu_merge, prepare as gpu_prepare

ROOT = Path(__file__).resolve().parents[1]
ABSENT_THERE = ("hydra", "mlflow", "dvc", "lm_eval", "datasets", "gguf")
SCALE_KEYS = {"shape", "weights", "stage", "device", "dtype", "method", "quant_weights", "peak_rss_gib",
              "peak_gpu_gib", "seconds", "command"}
BENCH_KEYS = {"device", "op", "model", "shape", "M", "ms", "speedup"}

# a python where the packages the GPU machine lacks are not found (as there: find_spec gives None)
BLOCKER = f"""
import sys
class _Absent:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_THERE!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [_Absent(f) for f in sys.meta_path]
"""


def run_blocked(code: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env_code = BLOCKER + code
    return subprocess.run([sys.executable, "-c", env_code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1"})


def test_modules_import_nothing_the_gpu_machine_lacks(tmp_path):
    code = ("import importlib.util; assert importlib.util.find_spec('mlflow') is None\n"
            "import pipeline.tools.gpu.check, pipeline.tools.gpu.stages, pipeline.tools.gpu.scale, pipeline.tools.gpu.kernels, "
            "pipeline.tools.gpu.merge, pipeline.tools.gpu.prepare, pipeline.fuse.streamed, pipeline.export.checkpoint\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ABSENT_THERE!r})\n"
            "print('loaded:', bad); assert not bad")
    done = run_blocked(code, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tiny_cpu_check_runs_every_part_and_writes_the_row_schemas(tmp_path):
    code = ("import runpy\n"
            f"sys.argv = ['gpu_check', '--device', 'cpu', '--tiny', '--out', {str(tmp_path)!r}]\n"
            "runpy.run_module('pipeline.tools.gpu.check', run_name='__main__')\n")
    done = run_blocked(code, tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    result = json.loads((tmp_path / gpu_check.RESULT_FILE).read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["tiny"] and result["meta"]["gpu"] is None
    assert {p["part"] for p in result["parts"]} == {"env", *gpu_check.ORDER}
    assert all(p["status"] == "ok" for p in result["parts"]), result["parts"]
    checks = result["checks"]
    assert {c["part"] for c in checks} == {"stages", "kernels"}
    assert all(c["ok"] and c["bound"] for c in checks)
    names = {c["name"] for c in checks}
    for stage in ("calibrate_act_stats", "rotate_global_rotations", "rotate_layerwise_rotations",
                  "approximate_subspace", "fuse_rtn_codes", "fuse_gptq_codes", "checkpoint_gptq",
                  "perplexity_gptq", "perplexity_layer_sequential_rtn"):
        assert stage in names
    assert any(n.startswith("gemm_w4a4") for n in names) and any(n.startswith("transition") for n in names)
    stages = {r["stage"] for r in result["scale"]}
    assert stages == {"rotate_global", "rotate_layerwise", "approximate", "fuse", "eval", "paper_protocol_total"}
    for r in result["scale"]:
        assert SCALE_KEYS <= set(r) and r["weights"] == "random" and r["device"] == "cpu"
    assert result["scale"][-1]["missing"] == []
    assert result["bench"] and all(BENCH_KEYS <= set(r) and r["ms"] > 0 for r in result["bench"])
    assert {r["op"] for r in result["bench"]} == {"linear_bf16", "linear_w4a4", "gemm_w4a4"}


def test_short_budget_skips_parts_with_a_row(tmp_path):
    gpu_check.main(["--device", "cpu", "--tiny", "--budget", "0.01", "--parts", "stages", "kernels",
                    "--out", str(tmp_path)])
    result = json.loads((tmp_path / gpu_check.RESULT_FILE).read_text())
    skipped = [p for p in result["parts"] if p["part"] != "env"]
    assert skipped and all(p["status"] == "skipped: budget" and "budget" in p["error"] for p in skipped)


def test_a_failing_part_is_a_row_and_the_rest_runs(tmp_path, monkeypatch):
    from pipeline.tools.gpu import kernels as gpu_kernels

    def broken(ctx):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(gpu_kernels, "PARTS", [gpu_check.Part("kernels_build", broken, 0, 0),
                                               *gpu_kernels.PARTS[1:2]])
    gpu_check.main(["--device", "cpu", "--tiny", "--parts", "kernels", "--out", str(tmp_path)])
    parts = {p["part"]: p for p in json.loads((tmp_path / gpu_check.RESULT_FILE).read_text())["parts"]}
    assert parts["kernels_build"]["status"] == "failed"
    assert parts["kernels_build"]["error"] == "RuntimeError: kernel exploded"
    assert "Traceback" in parts["kernels_build"]["traceback_tail"]
    assert parts["kernels_correctness"]["status"] == "ok"


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0"], "--layers=0"),
    (["--layers", "40"], "32 decoder layers"),
    (["--parts", "stages", "nope"], "--parts nope"),
    (["--budget", "-1"], "--budget"),
])
def test_bad_input_is_one_line(tmp_path, argv, message):
    with pytest.raises(gpu_check.PipelineError, match=message):
        gpu_check.parse_args(["--out", str(tmp_path), *argv])


def test_unknown_flag_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--out", str(tmp_path), "--frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frobnicate" in err


def synthetic_result() -> dict:
    scale = {"shape": "llama3_8b", "weights": "random", "stage": "fuse", "device": "cuda", "gpu": "NVIDIA H200",
             "dtype": "bfloat16", "method": "respinquant", "quant_weights": "gptq", "peak_rss_gib": 20.0,
             "peak_gpu_gib": 31.5, "seconds": 40.0, "measured": "streamed fuse of 2 layers", "layers": 2,
             "projected_seconds": 500.0, "command": "python -m pipeline.tools.gpu.check"}
    total = {**scale, "stage": "paper_protocol_total", "seconds": 1800.0, "projected_seconds": 1800.0, "layers": 32,
             "paper_seconds_h100": 2520.0, "ratio_to_paper": 0.714, "included": ["fuse"], "missing": [],
             "note": "calibration statistics and evaluation not included; random weights"}
    bench = [{"device": "cuda", "gpu": "NVIDIA H200", "op": op, "model": "llama3_8b", "shape": "qkv 4096x6144",
              "M": 2048, "ms": ms, "speedup": round(0.137 / ms, 4)} for op, ms in (("linear_bf16", 0.137),
                                                                                   ("linear_w4a4", 0.2))]
    return {"schema": 1, "meta": {"date": "2026-12-04T18:00:00+00:00", "device": "cuda", "gpu": "NVIDIA H200",
                                  "elapsed_s": 300.0, "budget_s": 330.0, "env": {"torch": "2.11.0", "driver": "580"}},
            "parts": [{"part": "env", "status": "ok", "seconds": 1.0},
                      {"part": "scale_eval", "status": "skipped: budget", "seconds": 0.0,
                       "error": "skipped: budget (3 s left, about 15 s needed)"}],
            "checks": [{"part": "kernels", "name": "gemm_w4a4_f32_16x64x96_s8", "ok": True, "bound": "bit-exact"},
                       {"part": "stages", "name": "fuse_gptq_codes", "ok": False, "bound": "share <= 0.01"}],
            "scale": [scale, total], "bench": bench}


def test_merge_into_scale_bench_and_readme(tmp_path):
    result_path = tmp_path / "gpu_check.json"
    result_path.write_text(json.dumps(synthetic_result()))
    scale, bench, readme = tmp_path / "scale.json", tmp_path / "bench-gpu.json", tmp_path / "README.md"
    scale.write_text((ROOT / "docs" / "scale.json").read_text())
    readme.write_text("# Project\n\nintro\n")
    before = json.loads(scale.read_text())
    argv = [str(result_path), "--scale", str(scale), "--bench", str(bench), "--readme", str(readme)]
    gpu_merge.main(argv)
    gpu_merge.main(argv)  # twice: the same result
    rows = json.loads(scale.read_text())
    assert rows[: len(before)] == before and len(rows) == len(before) + 2
    assert all(r["source"] == "gpu_check" and r["gpu"] == "NVIDIA H200" for r in rows[len(before):])
    published = json.loads(bench.read_text())
    assert published["gpu"] == "NVIDIA H200" and len(published["rows"]) == 2 and published["checks"]
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n") and text.count(gpu_merge.BEGIN) == 1
    assert "NVIDIA H200, 2026-12-04" in text and "Random weights" in text
    assert "1 of 2 passed" in text and "`stages/fuse_gptq_codes`" in text and "skipped: budget" in text
    assert "| linear_w4a4 | qkv 4096x6144 | 2048 |" in text and "30.0 min" in text


def test_merge_refuses_a_cpu_result_and_a_stranger(tmp_path):
    result = synthetic_result()
    result["meta"]["device"] = "cpu"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    with pytest.raises(gpu_merge.PipelineError, match="not a GPU"):
        gpu_merge.main([str(path), "--scale", str(tmp_path / "s"), "--bench", str(tmp_path / "b"),
                        "--readme", str(tmp_path / "R")])
    path.write_text("[1, 2]")
    with pytest.raises(gpu_merge.PipelineError, match="not a gpu_check result"):
        gpu_merge.read_result(path)


def test_prepared_command_fits_the_device_limits():
    command = gpu_prepare.run_command(".gpu_carry", 330)
    assert len(command) <= 2000
    assert ".gpu_carry/whl/*.whl" in command and "RSQ_DATA_DIR=$PWD/.gpu_carry/data" in command
    assert "python3 -m pipeline.tools.gpu.check --budget 330 --out $OUT" in command
