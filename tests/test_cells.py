"""The experiment matrix in cells (pipeline.tools.cells): run order, resumption, skip by config, deadline,
bad input as one line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.tools import cells
from pipeline.tools.cells import Cell, cells_of, load_matrix
from helpers import mlflow_uri
from stage_runner import run_script

TINY = ["train.windows=4", "train.seqlen=64", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=0",
        "calib.stats_windows=1", "eval.seqlen=128"]


def _matrix(tmp_path, **changes) -> tuple[dict, str]:
    matrix = {"model": "tiny_llama", "dtype": "float32", "eval_windows": 2, "overrides": TINY,
              "groups": [{"quants": ["w4a4kv4"], "weights": "gptq", "seeds": [1], "variants": ["spinquant"]}]}
    matrix.update(changes)
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return matrix, str(path)


def test_cells_run_in_group_order_and_merge_variants():
    matrix = {"model": "m", "groups": [
        {"quants": ["a", "b"], "weights": "gptq", "seeds": [0], "variants": ["x", "y"]},
        {"quants": ["a", "b"], "weights": "gptq", "seeds": [0], "variants": ["z"]},
        {"quants": ["a"], "weights": "gptq", "seeds": [1, 2], "variants": ["x"]}]}
    got = [(c.key, c.variants) for c in cells_of(matrix)]
    assert got == [("m/a-gptq/seed0", ("x", "y", "z")), ("m/b-gptq/seed0", ("x", "y", "z")),
                   ("m/a-gptq/seed1", ("x",)), ("m/a-gptq/seed2", ("x",))]


@pytest.mark.parametrize("change, message", [
    ({"groups": [{"quants": ["w4a4kv4"], "weights": "awq", "seeds": [0], "variants": ["rtn"]}]}, "choose rtn or gptq"),
    ({"groups": [{"quants": ["w4a4kv4"], "weights": "rtn", "seeds": [-1], "variants": ["rtn"]}]}, "integers >= 0"),
    ({"groups": [{"quants": ["w4a4kv4"], "weights": "rtn", "seeds": [0]}]}, "lacks variants"),
    ({"groups": [{"quants": ["w9a9"], "weights": "rtn", "seeds": [0], "variants": ["rtn"]}]}, "no conf/quant/w9a9.yaml"),
    ({"groups": [{"quants": ["w4a4kv4"], "weights": "rtn", "seeds": [0], "variants": ["nope"]}]}, "nope not in"),
])
def test_bad_matrix_is_one_line(tmp_path, capsys, change, message):
    _, path = _matrix(tmp_path, **change)
    with pytest.raises(SystemExit) as exit_:
        cells.main(["--matrix", path, "--dry-run", "--results", str(tmp_path / "r"), "--scratch", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_bad_deadline_and_unknown_cell(tmp_path, capsys):
    _, path = _matrix(tmp_path)
    for argv, message in ((["--deadline", "0"], "give minutes > 0"), (["--only", "w2a2"], "matches no cell")):
        with pytest.raises(SystemExit):
            cells.main(["--matrix", path, *argv])
        assert message in capsys.readouterr().err


def test_result_config_ignores_where_it_ran(tmp_path):
    matrix, _ = _matrix(tmp_path)
    cell = cells_of(matrix)[0]
    base = cells.cell_config(cell, matrix, tmp_path)
    digest = cells.config_sha256(cells.result_config(base, cell, "layerwise"))
    moved = cells.cell_config(cell, {**matrix, "overrides": [*TINY, "train.device=cpu", "eval.batch_size=3"]},
                              tmp_path / "elsewhere")
    assert cells.config_sha256(cells.result_config(moved, cell, "layerwise")) == digest
    # layerwise's result depends on spinquant's global set: a change there changes it
    other = cells.cell_config(cell, {**matrix, "overrides": [*TINY, "train.steps=3"]}, tmp_path)
    assert cells.config_sha256(cells.result_config(other, cell, "layerwise")) != digest
    assert set(cells.result_config(base, cell, "layerwise")["variants"]) == {"layerwise", "spinquant"}


def _forked_stage(cmd: list[str]) -> int:
    """``cells.run_stage_command`` through the tests' fork server (tests/stage_runner.py), output passed on."""
    proc = run_script(Path(cmd[1]), cmd[2:], dict(os.environ), cells.REPO_ROOT, timeout=600)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def test_cell_runs_resumes_and_skips(tmp_path, monkeypatch, capsys):
    """One tiny cell end to end: the result file, then a rerun that runs nothing, a lost result rebuilt
    from the stage markers without rerunning a stage, a changed config rerun, and a deadline stop."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri(tmp_path))
    monkeypatch.setattr(cells, "run_stage_command", _forked_stage)
    _, path = _matrix(tmp_path)
    dirs = ["--results", str(tmp_path / "results"), "--scratch", str(tmp_path / "scratch")]
    cells.main(["--matrix", path, *dirs])
    result_path = tmp_path / "results" / "tiny_llama" / "w4a4kv4-gptq" / "seed1" / "spinquant.json"
    result = json.loads(result_path.read_text())
    assert result["variant"] == "spinquant" and result["weights"] == "gptq" and result["seed"] == 1
    assert len(result["window_nll"]) == result["windows"] == 2 and result["wikitext2_ppl"] > 1
    assert result["config"]["variants"]["spinquant"]["quant"]["a_clip_ratio"] == 0.9
    assert {"calibrate", "train_rotation:global variant=spinquant", "fuse variant=spinquant",
            "eval variant=spinquant"} == set(result["stage_seconds"])
    assert result["corpus_sha256"] and result["dtype"] == "float32" and result["host_cpu"]
    capsys.readouterr()

    cells.main(["--matrix", path, *dirs])
    assert "done (committed result matches)" in capsys.readouterr().out

    result_path.unlink()  # killed after the last stage, before the result: the markers rebuild it
    cells.main(["--matrix", path, *dirs])
    out = capsys.readouterr().out
    assert "0 of 4 stages to run" in out and json.loads(result_path.read_text())["window_nll"] == result["window_nll"]

    _, path = _matrix(tmp_path, eval_windows=1)  # another config: the variant runs again
    cells.main(["--matrix", path, "--deadline", "0.01", *dirs])
    out = capsys.readouterr().out
    assert "deadline:" in out and "0 result(s) written" in out
    cells.main(["--matrix", path, *dirs])
    assert json.loads(result_path.read_text())["windows"] == 1


def test_cell_key_and_paths(tmp_path):
    cell = Cell("m", "w4a4kv4", "gptq", 3, ("spinquant",))
    assert cell.result_path("spinquant", tmp_path) == tmp_path / "m" / "w4a4kv4-gptq" / "seed3" / "spinquant.json"
    assert load_matrix()["groups"]  # the committed matrix parses


def test_stage_markers_ignore_report_and_bench_settings(tmp_path):
    matrix, _ = _matrix(tmp_path)
    cell = cells_of(matrix)[0]
    base = cells.config_sha256(cells.cell_config_key(cells.cell_config(cell, matrix, tmp_path), cell))
    other = {**matrix, "overrides": [*TINY, "report.level=0.9", "bench.m=[1]", "eval.batch_size=2"]}
    assert cells.config_sha256(cells.cell_config_key(cells.cell_config(cell, other, tmp_path / "x"), cell)) == base
    trained = {**matrix, "overrides": [*TINY, "train.lr=1.0"]}
    assert cells.config_sha256(cells.cell_config_key(cells.cell_config(cell, trained, tmp_path), cell)) != base
