"""``device`` (auto | cpu | cuda | cuda:N) and ``model.dtype``: resolved and checked up front, in one line."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import model_cfg
from pipeline.infra import devices
from pipeline.model import load as models
from pipeline.infra.artifacts import load_tensors
from pipeline.infra.errors import PipelineError
from helpers import one_line_error, run_stage

NO_CUDA = not torch.cuda.is_available()


def _exit_2_one_line(proc, expected: str) -> None:
    """Exit status 2, no traceback, and stderr is the single ``error:`` line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc, expected)
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: ")


def test_auto_and_cpu_resolve():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve_device("auto").type == expected
    assert devices.resolve_device(None).type == expected
    assert devices.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this host has a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_host_names_the_key(name):
    with pytest.raises(PipelineError, match=rf"^train\.device={name}: this host has no usable CUDA GPU") as exc:
        devices.resolve_device(name, "train.device")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps", ""])
def test_unknown_device_names_the_key(name):
    with pytest.raises(PipelineError, match=rf"^device={name}: choose auto, cpu, cuda or cuda:N$"):
        devices.resolve_device(name)


def test_dtypes():
    assert devices.resolve_dtype(None) is torch.float32
    assert devices.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(PipelineError, match=r"^model\.dtype=int8: choose auto or one of float32, float64, bfloat16, float16$"):
        devices.resolve_dtype("int8")
    for dtype in (torch.float32, torch.bfloat16):
        devices.check_dtype(torch.device("cpu"), dtype)
    assert devices.setup("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_cpu_native_bf16_is_a_bool():
    assert isinstance(devices.cpu_native_bf16(), bool)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert devices.resolve_dtype("auto", device=torch.device("cpu")) is expected
    assert devices.setup("cpu", "auto") == (torch.device("cpu"), expected)


def test_auto_dtype_is_resolved_before_the_stage_and_named_in_its_outputs(tmp_path):
    """``model.dtype=auto`` reaches the stage (and its artifacts) as the concrete dtype of this host."""
    for script in ("calibrate.py", "train_rotation.py", "fuse.py"):
        proc = run_stage(tmp_path, script, "+model=tiny_llama", "method=quarot", "quant=w16a16", "model.dtype=auto",
                      "device=cpu", "calib.n_windows=2", "calib.seqlen=32", "calib.stats_windows=1")
        assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "bfloat16" if devices.cpu_native_bf16() else "float32"
    configs = list((tmp_path / "a" / "fused").glob("*/rsq_config.json"))
    assert len(configs) == 1 and json.loads(configs[0].read_text())["dtype"] == expected


def test_load_model_on_a_device_and_bad_dtype():
    model, _ = models.load_model(model_cfg("tiny_llama"), torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    cfg = model_cfg("tiny_llama")
    cfg.dtype = "int8"
    with pytest.raises(PipelineError, match=r"^model\.dtype=int8: choose auto or one of"):
        models.load_model(cfg)


@pytest.mark.skipif(not NO_CUDA, reason="this host has a CUDA GPU")
def test_cuda_on_a_cpu_host_is_one_line_before_any_work(tmp_path):
    proc = run_stage(tmp_path, "train_rotation.py", "+model=tiny_llama", "method=spinquant", "device=cuda")
    _exit_2_one_line(proc, "error: train.device=cuda: this host has no usable CUDA GPU")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "device=cuda")
    _exit_2_one_line(proc, "error: device=cuda: this host has no usable CUDA GPU")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_bad_dtype_is_one_line(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "model.dtype=int8")
    _exit_2_one_line(proc, "error: model.dtype=int8: choose auto or one of float32, float64, bfloat16, float16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_calibrate_on_an_explicit_cpu(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "device=cpu",
                  "calib.n_windows=2", "calib.seqlen=64", "calib.stats_windows=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "a" / "calib").glob("windows-*.safetensors")  # named by its setting's tag
    windows = load_tensors(path)[0]["windows"]
    assert windows.shape == (2, 64) and windows.device.type == "cpu"
    with (tmp_path / "m" / "act_stats" / "original.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["absmax"]) > 0 for r in rows)
