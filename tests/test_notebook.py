"""notebooks/results.ipynb runs top to bottom on the committed metrics (its code cells, in order)."""
from __future__ import annotations

import json
import os

import matplotlib

from conftest import ROOT


def test_results_notebook_runs(monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(ROOT / "notebooks")
    nb = json.loads((ROOT / "notebooks" / "results.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "results.ipynb", "exec"), scope)
    assert set(scope["ppl"].index) >= {"fp16", "rtn", "quarot"}
    assert scope["ppl"].loc["quarot", "wikitext2_ppl"] < scope["ppl"].loc["rtn", "wikitext2_ppl"]
    assert "original" in scope["outliers"].index and os.path.isdir(scope["METRICS"])
