"""Seeds and intervals: mean ± std over seeds, the paired bootstrap of ppl ratios, the seed-run plan."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import compose_pipeline
from pipeline.errors import PipelineError
from pipeline.seed_runs import seed_config, stage_plan
from pipeline.seed_stats import mean_std, paired_ratio, seed_ppls


def _nll(seeds: int, windows: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + scale * torch.randn(seeds, windows, generator=g, dtype=torch.float64)


def test_mean_std_over_seeds():
    nll = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 2.0]], dtype=torch.float64)  # every seed: mean NLL 2 or 1
    assert seed_ppls(nll).tolist() == pytest.approx([math.e**2, math.e**2, math.e])
    mean, std = mean_std(nll)
    ppl = torch.tensor([math.e**2, math.e**2, math.e])
    assert mean == pytest.approx(ppl.mean().item()) and std == pytest.approx(ppl.std().item())
    assert mean_std(nll[:1])[1] is None  # one seed: no spread


def test_identical_variants_have_ratio_one_and_no_difference():
    a = _nll(3, 16, 0)
    r = paired_ratio(a, a.clone(), draws=500)
    assert (r.ratio, r.low, r.high) == (1.0, 1.0, 1.0) and not r.significant


def test_a_constant_shift_is_exact_and_significant():
    """b = a + δ on every window of every seed: every draw's ratio is exp(-δ) (pairing cancels the noise)."""
    a = _nll(3, 16, 1, scale=0.5)
    r = paired_ratio(a, a + 0.01, draws=500)
    assert r.ratio == pytest.approx(math.exp(-0.01), rel=1e-3)
    assert r.high < 1.0 and r.significant
    assert r.high - r.low < 1e-3  # the per-window noise (0.5 nats) is paired away


def test_unpaired_noise_is_not_significant_and_the_interval_covers():
    """Two variants with the same distribution: over many replicate tables the 95% interval excludes 1
    rarely (a check of calibration, loose because S and W are small)."""
    excluded = 0
    for rep in range(40):
        r = paired_ratio(_nll(3, 32, 100 + rep), _nll(3, 32, 500 + rep), draws=400, seed=rep)
        assert r.low <= r.ratio <= r.high
        excluded += r.significant
    assert excluded <= 8


def test_interval_is_deterministic_and_narrows_with_windows():
    a, b = _nll(3, 64, 2), _nll(3, 64, 3) + 0.02
    assert paired_ratio(a, b, draws=300) == paired_ratio(a, b, draws=300)
    wide, narrow = paired_ratio(a[:, :8], b[:, :8], draws=300), paired_ratio(a, b, draws=300)
    assert narrow.high - narrow.low < wide.high - wide.low


@pytest.mark.parametrize("kwargs, message", [({"level": 1.0}, "report.level=1.0"), ({"draws": 0}, "report.bootstrap=0")])
def test_bad_bootstrap_settings(kwargs, message):
    a = _nll(2, 4, 0)
    with pytest.raises(PipelineError, match=message):
        paired_ratio(a, a, **kwargs)
    with pytest.raises(PipelineError, match="two equal"):
        paired_ratio(a, a[:, :3])


def test_seed_run_plan_follows_the_shared_sets():
    """respinquant_chained needs spinquant's global set, layerwise's per-layer set and its own subspace."""
    cfg = seed_config(2, [])
    assert cfg.seed == 2 and cfg.paths.metrics == "metrics/seeds/seed2"
    assert cfg.variants.spinquant.method.seed == 2 and cfg.train.seed == 2  # signs and batch order follow
    assert stage_plan(cfg, ["respinquant_chained"]) == [
        ("calibrate", []),
        ("train_rotation", ["variant=spinquant", "rotation_stage=global"]),
        ("train_rotation", ["variant=layerwise", "rotation_stage=layerwise"]),
        ("approximate", ["variant=respinquant_chained"]),
        ("fuse", ["variant=respinquant_chained"]),
        ("eval", ["variant=respinquant_chained"]),
    ]
    plan = stage_plan(cfg, ["spinquant", "layerwise", "respinquant"])
    assert [s for s, _ in plan].count("train_rotation") == 2 and len(plan) == 1 + 2 + 1 + 3 + 3
    with pytest.raises(PipelineError, match="--variants nope: not in variants"):
        stage_plan(cfg, ["nope"])


def test_the_seed_reaches_every_seeded_choice():
    cfg = compose_pipeline(["seed=5"])
    assert cfg.train.seed == 5 and all(cfg.variants[v].method.seed == 5 for v in cfg.variants)


def test_seed_runs_refuse_seed_zero(capsys):
    from pipeline.seed_runs import main

    with pytest.raises(SystemExit) as exc:
        main(["--seeds", "0"])
    assert exc.value.code == 2 and "seed 0 is what dvc repro makes" in capsys.readouterr().err


def _report_cfg(tmp_path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"variants": {"spinquant": {}, "quarot": {}}, "paths": {"metrics": str(tmp_path)},
                             "report": {"seeds": [0, 1], "bootstrap": 100, "level": 0.95}})


def _write_eval(root, name, method, nll, seed=0, sha="abc"):
    import json

    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval_windows").mkdir(parents=True, exist_ok=True)
    (root / "eval" / f"{name}.json").write_text(json.dumps(
        {"method": method, "quant": "w4a4kv4", "weights": "rtn", "wikitext2_ppl": math.exp(sum(nll) / len(nll))}))
    (root / "eval_windows" / f"{name}.json").write_text(json.dumps(
        {"seed": seed, "corpus": "wikitext2", "text_sha256": sha, "seqlen": 8, "window_nll": nll}))


def test_report_rows_pair_every_seed_and_refuse_other_windows(tmp_path):
    from pipeline.steps.report import method_rows

    _write_eval(tmp_path, "spinquant", "spinquant", [3.0, 3.2])
    _write_eval(tmp_path, "quarot", "quarot", [3.1, 3.3])
    _write_eval(tmp_path / "seeds" / "seed1", "spinquant", "spinquant", [3.4, 3.0], seed=1)
    rows = {r["variant"]: r for r in method_rows(_report_cfg(tmp_path))}
    assert rows["spinquant"]["seeds"] == 2 and rows["quarot"]["seeds"] == 1
    assert rows["quarot"]["ratio_vs_spinquant"] == pytest.approx(math.exp(0.1))  # paired on seed 0 only
    assert rows["spinquant"]["ratio_vs_spinquant"] is None and rows["quarot"]["ratio_vs_layerwise"] is None
    _write_eval(tmp_path / "seeds" / "seed1", "spinquant", "spinquant", [3.4, 3.0], seed=1, sha="other")
    with pytest.raises(PipelineError, match=r"spinquant \(seed 0\) and spinquant \(seed 1\) were evaluated on different windows"):
        method_rows(_report_cfg(tmp_path))
