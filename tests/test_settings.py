"""Outputs are named by, and consumers check, the whole setting that made them (pipeline/infra/settings.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.results import SeedResult, check_made_under
from pipeline.infra import paths
from pipeline.infra.artifacts import load_tensors
from pipeline.infra.errors import PipelineError
from pipeline.infra.settings import SETTING_KEY, check_setting, record, rotation_setting
from helpers import hand_run, one_line_error, run_stage

RESPIN = ("+model=tiny_llama", "method=respinquant")


def test_check_setting_names_both_values_in_one_line():
    recorded = {"seed": 1, "quant": {"a_bits": 4, "w_bits": 4}}
    check_setting("x", record(recorded), json.loads(record(recorded)), "rerun it")  # equal: no error
    with pytest.raises(PipelineError) as err:
        check_setting("rot.safetensors", record(recorded), {"seed": 0, "quant": {"a_bits": 16, "w_bits": 4}}, "rerun it")
    assert str(err.value) == ("rot.safetensors was made under another setting: quant.a_bits=4 (this run: 16); "
                              "seed=1 (this run: 0): rerun it")
    with pytest.raises(PipelineError, match="records no setting .made by an older version.: rerun it"):
        check_setting("old.safetensors", None, recorded, "rerun it")


def test_approximate_refuses_a_set_made_under_another_setting(tmp_path):
    """The review's seed case at the consumer: a per-layer set trained with seed=1 sitting where the seed-0
    run reads is refused (it used to be fused and labelled seed 0), and no subspace is written."""
    common = (*RESPIN, "calib.n_windows=2", "calib.seqlen=32", "calib.stats_windows=1", "train.steps=1",
              "train.batch_size=1", "train.checkpoint_every=0")
    assert run_stage(tmp_path, "calibrate.py", *common, "seed=1").returncode == 0
    for stage in ("global", "layerwise"):  # only seed 1 is trained: approximate reads nothing else
        proc = run_stage(tmp_path, "train_rotation.py", *common, "seed=1", f"rotation_stage={stage}")
        assert proc.returncode == 0, proc.stderr[-1500:]
    seed0, seed1 = (hand_run(tmp_path, *common, s)[1] for s in ("seed=0", "seed=1"))
    mine, theirs = (paths.rotations(c, c.sources["layerwise"], "layerwise") for c in (seed0, seed1))
    assert mine != theirs and theirs.is_file() and not mine.exists()  # two seeds, two paths: no overwrite
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(theirs.read_bytes())
    one_line_error(run_stage(tmp_path, "approximate.py", *common, "seed=0"),
                   "was made under another setting: calib.seed=1 (this run: 0)")
    assert not paths.subspace(seed0, seed0.sources["subspace"]).exists()
    # recorded as made: the set's setting is the one the seed-1 run implies
    assert json.loads(load_tensors(theirs)[1][SETTING_KEY]) == json.loads(record(rotation_setting(seed1, "layerwise")))


def _run(tmp_path: Path, config: dict | None) -> SeedResult:
    result = {"method": "quarot", "quant": "w4a4kv4", "seed": 1}
    if config is not None:
        result["config"] = config
    return SeedResult(1, tmp_path / "quarot.json", result, {})


def test_report_refuses_results_made_under_another_setting(tmp_path):
    expected = {"seed": 0, "method": {"name": "quarot", "seed": 0}, "quant": {"a_bits": 4, "w_group_size": 0}}
    check_made_under("quarot", [_run(tmp_path, {**expected, "seed": 1, "method": {"name": "quarot", "seed": 1}})],
                     expected)  # another seed is what a row pools
    other = {**expected, "quant": {"a_bits": 4, "w_group_size": 64}}
    with pytest.raises(PipelineError, match=r"quarot.json was made under another setting than variant quarot's: "
                                            r"quant.w_group_size=64 \(this run: 0\)"):
        check_made_under("quarot", [_run(tmp_path, other)], expected)
    with pytest.raises(PipelineError, match="records no setting"):
        check_made_under("quarot", [_run(tmp_path, None)], expected)
