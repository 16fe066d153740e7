"""Seeds and intervals: mean ± std over seeds, paired t-intervals of ppl ratios (their level and power by
simulation), the seed-run plan, the report's pooling of seed runs."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.infra.config import compose_pipeline
from pipeline.infra.errors import PipelineError
from pipeline.tools.seed_runs import seed_config, stage_plan
from pipeline.eval.seed_stats import mean_std, paired_ratio, seed_ppls, student_t_cdf, student_t_quantile


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


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)])
def test_t_quantile_matches_the_table(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=5e-4)
    assert student_t_cdf(student_t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-9)


def test_identical_variants_have_ratio_one_and_no_difference():
    a = _nll(3, 16, 0)
    r = paired_ratio(a, a.clone())
    assert (r.ratio, r.low, r.high) == (1.0, 1.0, 1.0) and r.significant is False


def test_a_constant_shift_is_exact_and_significant():
    """b = a + δ on every window of every seed: every seed's log ratio is -δ (pairing cancels the noise)."""
    a = _nll(3, 16, 1, scale=0.5)
    r = paired_ratio(a, a + 0.01)
    assert r.ratio == pytest.approx(math.exp(-0.01), rel=1e-9)
    assert r.high < 1.0 and r.significant
    assert r.high - r.low < 1e-9  # the per-window noise (0.5 nats) is paired away


def test_one_seed_has_a_ratio_but_no_interval_and_no_verdict():
    a = _nll(1, 32, 2)
    r = paired_ratio(a, a + 0.05)
    assert r.ratio == pytest.approx(math.exp(-0.05)) and (r.low, r.high, r.significant) == (None, None, None)


def test_the_interval_is_the_t_interval_of_the_per_seed_log_ratios():
    a = _nll(4, 8, 3)
    d = torch.tensor([0.02, 0.03, 0.04, 0.03], dtype=torch.float64)  # each seed's log ratio
    b = a - d[:, None]
    half = 3.182446 * d.std().item() / 2.0  # t_{0.975, 3}, sqrt(4)
    r = paired_ratio(a, b)
    assert (r.ratio, r.low, r.high) == pytest.approx((math.exp(0.03), math.exp(0.03 - half), math.exp(0.03 + half)))
    assert r.significant and (r.seeds, r.windows) == (4, 8)


WINDOWS = 32


def _tables(n: int, seeds: int, seed_sd: float, effect: float, gen: torch.Generator,
            window_sd: float = 0.05) -> torch.Tensor:
    """(n, 2, seeds, WINDOWS) NLL tables of two rows: a shared text difficulty per window (0.3 nats), a
    per-row-per-seed shift (``seed_sd``: what a seed moves, the whole row at once), per-window noise of
    each row and seed (``window_sd``), and ``effect`` nats added to row 0."""
    text = 0.3 * torch.randn(n, 1, 1, WINDOWS, generator=gen, dtype=torch.float64)
    shift = seed_sd * torch.randn(n, 2, seeds, 1, generator=gen, dtype=torch.float64)
    noise = window_sd * torch.randn(n, 2, seeds, WINDOWS, generator=gen, dtype=torch.float64)
    tables = 3.0 + text + shift + noise
    tables[:, 0] += effect
    return tables


def _flagged(tables: torch.Tensor) -> float:
    """The fraction of tables whose 95% interval excludes 1."""
    return sum(bool(paired_ratio(t[0], t[1]).significant) for t in tables) / len(tables)


@pytest.mark.parametrize("seeds", [3, 5])
def test_same_distribution_is_flagged_at_the_nominal_rate(seeds):
    """1000 null tables with the reviewer's setting (seed shift 0.10 nats, 32 windows): the reviewer measured
    the former paired bootstrap over seeds and windows flagging 92% / 20% / 15% at 1 / 3 / 5 seeds; the
    t-interval holds 5%. Measured with these generators: 3 seeds 5.0%, 5 seeds 5.3%."""
    rate = _flagged(_tables(1000, seeds, seed_sd=0.10, effect=0.0, gen=torch.Generator().manual_seed(seeds)))
    assert rate <= 0.08, f"false-positive rate {rate:.3f} at {seeds} seeds"
    one = _tables(50, 1, seed_sd=0.10, effect=0.0, gen=torch.Generator().manual_seed(1))
    assert all(paired_ratio(t[0], t[1]).significant is None for t in one)  # 1 seed: no verdict at all


def test_a_five_percent_effect_is_found_at_five_seeds():
    """Power against a true 5% ppl ratio (log 1.05 nats on every window of one row), 400 tables, 32 windows.
    With a seed shift of 0.02 nats (about 2% ppl from seed to seed: a plausible size for W4A4 rotation
    seeds, not yet measured here) 5 seeds find it in 79% of tables (3 seeds: 33%), while 1000 null tables
    stay at 5.4%. With the reviewer's 0.10 nats 5 seeds find it in about 12%: no honest test resolves 5%
    there; that table needs more seeds, not a looser interval."""
    gen = torch.Generator().manual_seed(7)
    power = _flagged(_tables(400, 5, seed_sd=0.02, effect=math.log(1.05), gen=gen))
    assert power >= 0.65, f"power {power:.3f} at 5 seeds"
    null = _flagged(_tables(1000, 5, seed_sd=0.02, effect=0.0, gen=gen))
    assert null <= 0.08, f"false-positive rate {null:.3f} at 5 seeds"


@pytest.mark.parametrize("kwargs, message", [({"level": 1.0}, "report.level=1.0"),
                                             ({"level": 0.0}, "report.level=0.0")])
def test_bad_interval_settings(kwargs, message):
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
    from pipeline.tools.seed_runs import main

    with pytest.raises(SystemExit) as exc:
        main(["--seeds", "0"])
    assert exc.value.code == 2 and "seed 0 is what dvc repro makes" in capsys.readouterr().err


def _report_cfg(tmp_path, variants=("spinquant", "quarot")):
    from omegaconf import OmegaConf

    return OmegaConf.create({"variants": dict.fromkeys(variants, {}), "paths": {"metrics": str(tmp_path)},
                             "report": {"seeds": [0, 1], "level": 0.95}})


def _write_eval(root, name, method, nll, seed=0, sha="abc", quant="w4a4kv4", weights="rtn"):
    import json

    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval_windows").mkdir(parents=True, exist_ok=True)
    (root / "eval" / f"{name}.json").write_text(json.dumps(
        {"method": method, "quant": quant, "weights": weights, "seed": seed, "layer_sequential": seed == 1,
         "wikitext2_ppl": math.exp(sum(nll) / len(nll))}))
    (root / "eval_windows" / f"{name}.json").write_text(json.dumps(
        {"seed": seed, "corpus": "wikitext2", "text_sha256": sha, "seqlen": 8, "window_nll": nll}))


def _seed1(tmp_path):
    return tmp_path / "seeds" / "seed1"


def test_report_rows_pair_every_seed_and_refuse_other_windows(tmp_path):
    from pipeline.steps.report import method_rows

    _write_eval(tmp_path, "spinquant", "spinquant", [3.0, 3.2])
    _write_eval(tmp_path, "quarot", "quarot", [3.1, 3.3])
    _write_eval(_seed1(tmp_path), "spinquant", "spinquant", [3.4, 3.0], seed=1)
    rows = {r["variant"]: r for r in method_rows(_report_cfg(tmp_path))}
    assert rows["spinquant"]["seeds"] == 2 and rows["quarot"]["seeds"] == 1
    assert rows["quarot"]["ratio_vs_spinquant"] == pytest.approx(math.exp(0.1))  # paired on seed 0 only
    # one common seed: a ratio, but no interval and no verdict (the csv's empty cells)
    assert (rows["quarot"]["ratio_vs_spinquant_ci_low"], rows["quarot"]["ratio_vs_spinquant_ci_high"],
            rows["quarot"]["significant_vs_spinquant"]) == (None, None, None)
    assert rows["spinquant"]["ratio_vs_spinquant"] is None and rows["quarot"]["ratio_vs_layerwise"] is None
    _write_eval(_seed1(tmp_path), "spinquant", "spinquant", [3.4, 3.0], seed=1, sha="other")
    with pytest.raises(PipelineError,
                       match=r"spinquant \(seed 0\) and spinquant \(seed 1\) were evaluated on different windows"):
        method_rows(_report_cfg(tmp_path))


def test_report_gives_a_verdict_from_two_seeds(tmp_path):
    from pipeline.steps.report import method_rows

    for root, seed, shift in ((tmp_path, 0, 0.0), (_seed1(tmp_path), 1, 0.01)):
        _write_eval(root, "spinquant", "spinquant", [3.0 + shift, 3.2 + shift], seed=seed)
        _write_eval(root, "quarot", "quarot", [3.1 + shift, 3.4 + shift], seed=seed)
    rows = {r["variant"]: r for r in method_rows(_report_cfg(tmp_path))}
    quarot = rows["quarot"]
    assert quarot["seeds"] == 2 and quarot["ratio_vs_spinquant"] == pytest.approx(math.exp(0.15))
    assert quarot["ratio_vs_spinquant_ci_low"] > 1.0 and quarot["significant_vs_spinquant"] == "yes"  # d = 0.15 twice


def test_report_refuses_to_pool_runs_of_another_configuration(tmp_path):
    """A w3a3kv3 row must not take a W4A4 seed-1 run (and say seeds: 2); the message names both files."""
    from pipeline.steps.report import method_rows

    _write_eval(tmp_path, "spinquant", "spinquant", [3.0, 3.2], quant="w3a3kv3")
    _write_eval(tmp_path, "quarot", "quarot", [3.1, 3.3], quant="w3a3kv3")
    _write_eval(_seed1(tmp_path), "spinquant", "spinquant", [3.4, 3.0], seed=1, quant="w4a4kv4")
    with pytest.raises(PipelineError) as err:
        method_rows(_report_cfg(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "differ in quant ('w3a3kv3' vs 'w4a4kv4')" in message
    assert str(tmp_path / "eval" / "spinquant.json") in message
    assert str(_seed1(tmp_path) / "eval" / "spinquant.json") in message


def test_report_compares_a_recorded_config_except_its_seeds(tmp_path):
    """Results that record their resolved ``config`` (the cells' layout) pool across seeds, whose seed
    reaches nested keys too; any other difference, however deep, is refused by its dotted name."""
    import json

    from pipeline.steps.report import method_rows

    def config(seed, lr=1.5):
        return {"model": {"name": "m", "dtype": "bfloat16"}, "train": {"seed": seed, "lr": lr}, "seed": seed}

    for root, seed in ((tmp_path, 0), (_seed1(tmp_path), 1)):
        _write_eval(root, "spinquant", "spinquant", [3.0, 3.2 + seed / 10], seed=seed)
        path = root / "eval" / "spinquant.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "config": config(seed), "commit": f"c{seed}"}))
    assert method_rows(_report_cfg(tmp_path, ["spinquant"]))[0]["seeds"] == 2
    path.write_text(json.dumps({**json.loads(path.read_text()), "config": config(1, lr=2.0)}))
    with pytest.raises(PipelineError, match=r"differ in train.lr \(1.5 vs 2.0\)"):
        method_rows(_report_cfg(tmp_path, ["spinquant"]))


def test_report_never_takes_a_reference_with_another_weight_quantizer(tmp_path):
    from pipeline.steps.report import method_rows

    _write_eval(tmp_path, "spinquant", "spinquant", [3.0, 3.2], weights="gptq")
    _write_eval(tmp_path, "quarot", "quarot", [3.1, 3.3], weights="rtn")
    _write_eval(tmp_path, "quarot_gptq", "quarot", [3.1, 3.3], weights="gptq")
    rows = {r["variant"]: r for r in method_rows(_report_cfg(tmp_path, ["spinquant", "quarot", "quarot_gptq"]))}
    assert rows["quarot"]["ratio_vs_spinquant"] is None  # no rtn spinquant row: no ratio, not the gptq one
    assert rows["quarot_gptq"]["ratio_vs_spinquant"] == pytest.approx(math.exp(0.1))
