"""The matrix's results table (pipeline.eval.cells_report) over synthetic result files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.eval import cells_report
from pipeline.eval.cells_report import matrix_markdown, matrix_rows
from pipeline.infra.errors import PipelineError


def _write(root, variant: str, seed: int, nll: list[float], quant: str = "w4a4kv4", weights: str = "gptq",
           windows_sha: str = "abc", **config_changes) -> None:
    config = {"model": {"name": "m"}, "seed": seed, "train": {"seed": seed, "steps": 24},
              "variants": {variant: {"method": {"name": variant, "seed": seed}, "quant": {"name": quant}}},
              **config_changes}
    result = {"model": "m", "variant": variant, "method": variant, "quant": quant, "weights": weights, "seed": seed,
              "windows": len(nll), "seqlen": 2048, "corpus": "wikitext2", "corpus_sha256": windows_sha,
              "wikitext2_ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll, "commit": f"c{seed}",
              "config": config, "config_sha256": "x"}
    path = root / "m" / f"{quant}-{weights}" / f"seed{seed}" / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def _nll(seed: int, shift: float) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (4.0 + shift + 0.1 * torch.randn(8, generator=g, dtype=torch.float64)).tolist()


def test_rows_pool_seeds_and_pair_with_the_group_references(tmp_path):
    for seed in (0, 1, 2):
        _write(tmp_path, "spinquant", seed, _nll(seed, 0.0))
        _write(tmp_path, "layerwise", seed, _nll(seed, -0.05))
    _write(tmp_path, "quarot", 0, _nll(0, 0.2))
    _write(tmp_path, "spinquant", 0, _nll(0, 0.5), quant="w3a3kv3")  # another group: never a reference here
    rows = {(r["quant"], r["variant"]): r for r in matrix_rows(tmp_path)}
    lw = rows[("w4a4kv4", "layerwise")]
    assert lw["seeds"] == "0 1 2" and lw["ppl_std"] is not None
    assert lw["ratio_vs_spinquant"] == pytest.approx(math.exp(-0.05)) and lw["significant_vs_spinquant"] == "yes"
    assert lw["ratio_vs_spinquant_ci_low"] == pytest.approx(lw["ratio_vs_spinquant_ci_high"])  # a constant shift
    quarot = rows[("w4a4kv4", "quarot")]
    assert quarot["paired_seeds_vs_spinquant"] == 1 and quarot["ratio_vs_spinquant_ci_low"] is None
    assert quarot["significant_vs_spinquant"] is None  # one seed: no verdict, not "no"
    assert rows[("w3a3kv3", "spinquant")]["ratio_vs_layerwise"] is None  # no layerwise in that group
    text = matrix_markdown(list(rows.values()))
    assert "(1 seed)" in text and "**m, w3a3kv3, gptq weights**" in text and " *" in text


def test_pooling_refuses_another_config_naming_both_files(tmp_path):
    _write(tmp_path, "spinquant", 0, _nll(0, 0.0))
    _write(tmp_path, "spinquant", 1, _nll(1, 0.0), train={"seed": 1, "steps": 100})
    with pytest.raises(PipelineError, match=r"seed0/spinquant.json and .*seed1/spinquant.json differ in train.steps"):
        matrix_rows(tmp_path)


def test_pairing_refuses_other_windows(tmp_path):
    _write(tmp_path, "spinquant", 0, _nll(0, 0.0))
    _write(tmp_path, "layerwise", 0, _nll(0, 0.0), windows_sha="other")
    with pytest.raises(PipelineError, match="evaluated on different windows"):
        matrix_rows(tmp_path)


def test_cli_writes_the_table_and_refuses_a_broken_file(tmp_path, capsys):
    _write(tmp_path / "r", "spinquant", 0, _nll(0, 0.0))
    out = tmp_path / "matrix.md"
    cells_report.main(["--results", str(tmp_path / "r"), "--out", str(out), "--csv", str(tmp_path / "rows.csv")])
    assert "| spinquant | 0 |" in out.read_text() and (tmp_path / "rows.csv").is_file()
    bad = tmp_path / "r" / "m" / "w4a4kv4-gptq" / "seed1" / "layerwise.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        cells_report.main(["--results", str(tmp_path / "r"), "--out", str(out)])
    assert exit_.value.code == 2 and "not a readable result" in capsys.readouterr().err
    assert matrix_markdown([]).startswith("No matrix results yet")


def test_cli_puts_the_table_between_the_readme_markers(tmp_path, capsys):
    _write(tmp_path / "r", "spinquant", 0, _nll(0, 0.0))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- matrix:begin -->\nold table\n<!-- matrix:end -->\n\nAfter.\n")
    cells_report.main(["--results", str(tmp_path / "r"), "--out", str(tmp_path / "m.md"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Title\n\n<!-- matrix:begin -->\n") and text.endswith("\n<!-- matrix:end -->\n\nAfter.\n")
    assert "old table" not in text and "| spinquant | 0 |" in text
    # a file without the markers: one line, nothing written
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(SystemExit) as exit_:
        cells_report.main(["--results", str(tmp_path / "r"), "--out", str(tmp_path / "n.md"), "--readme", str(plain)])
    assert exit_.value.code == 2 and "needs one <!-- matrix:begin --> line" in capsys.readouterr().err
    assert plain.read_text() == "no markers\n" and not (tmp_path / "n.md").exists()
