"""params.yaml is exactly what conf/ composes; variants and hand-run configs compose as documented."""
from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT
from pipeline.infra.config import compose_pipeline, select_variant
from pipeline.infra.errors import PipelineError


def test_params_yaml_equals_composed_conf():
    composed = OmegaConf.to_container(compose_pipeline(), resolve=True)
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert on_disk == composed, "params.yaml is stale: run `python -m pipeline.infra.config` (or dvc exp run)"


def test_dvc_hydra_integration_configured():
    text = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text and "config_name = pipeline" in text


def test_variant_selects_method_and_quant():
    cfg = compose_pipeline()
    cfg.variant = "fp16"
    name, chosen = select_variant(cfg)
    assert name == "fp16"
    assert chosen.method.name == "rtn" and chosen.quant.w_bits == 16 and chosen.quant.a_bits == 16
    assert cfg.quant.w_bits == 4  # the input config is not mutated


def test_hand_run_name_without_variant():
    cfg = compose_pipeline(["method=rtn", "quant=w3a3kv3"])
    cfg.variant = None
    name, chosen = select_variant(cfg)
    assert name.startswith("rtn_w3a3kv3-") and chosen.quant.a_bits == 3


def _hand_names(*overrides: str) -> tuple[str, dict]:
    cfg = compose_pipeline(["method=respinquant", "quant.weight_method=gptq", *overrides])
    cfg.variant = None
    name, chosen = select_variant(cfg)
    return name, dict(chosen.sources)


@pytest.mark.parametrize("override", ["quant.a_bits=16", "quant.kv_bits=16", "quant.w_bits=5", "quant.w_group_size=64",
                                      "quant.a_clip_ratio=1.0", "quant.weight_method=rtn", "seed=1", "method.r2=hadamard",
                                      "model=tiny_llama", "model.dtype=float32", "train.steps=3", "approx.rank=8"])
def test_hand_runs_that_differ_in_a_setting_never_share_an_output(override):
    """The review's case: `fuse quant.a_bits=16 quant.kv_bits=16` wrote over the W4A4 checkpoint (and a seed-1
    fuse labelled its output seed 0): every setting an output depends on is in its name."""
    assert _hand_names(override)[0] != _hand_names()[0]


def test_rotation_sets_are_shared_only_where_the_setting_allows():
    base_name, base = _hand_names()
    # the weight quantizer and the rank act at fuse/approximate: the trained set is reused, the output is not
    for override in ("quant.w_bits=5", "quant.weight_method=rtn", "approx.rank=8"):
        name, sources = _hand_names(override)
        assert sources["layerwise"] == base["layerwise"] and name != base_name
    # training sees the activation quantizer and the seed: another set
    for override in ("quant.a_bits=8", "seed=1", "train.steps=3"):
        assert _hand_names(override)[1]["layerwise"] != base["layerwise"]
    # the subspace follows the rank, not the weight quantizer
    assert _hand_names("approx.rank=8")[1]["subspace"] != base["subspace"]
    assert _hand_names("quant.weight_method=rtn")[1]["subspace"] == base["subspace"]


def test_quant_label_follows_the_fields():
    from pipeline.infra.settings import quant_label

    for path in (ROOT / "conf" / "quant").glob("*.yaml"):  # the presets' names are their labels
        preset = OmegaConf.load(path)
        assert quant_label(preset) == preset.name
    assert quant_label({"w_bits": 4, "a_bits": 16, "kv_bits": 16}) == "w4a16"
    assert quant_label({"w_bits": 4, "a_bits": 4, "kv_bits": 4, "w_group_size": 128}) == "w4g128a4kv4"


def test_every_quant_preset_is_valid():
    from pipeline.methods import quant_spec

    for path in (ROOT / "conf" / "quant").glob("*.yaml"):
        spec = quant_spec(OmegaConf.load(path))
        assert path.stem == f"w{spec.w_bits}a{spec.a_bits}" + ("" if spec.kv_bits == 16 else f"kv{spec.kv_bits}")


# The `dvc exp run -S '...'` overrides that conf/pipeline.yaml's comment gives for adding the GPTQ
# ReSpinQuant variant to dvc repro (README "What runs"), read from the file so the recipe is what is tested.
PIPELINE_RECIPES = re.findall(r"-S '([^']+)'", (ROOT / "conf" / "pipeline.yaml").read_text())
ADD_GPTQ_VARIANT = [o for o in PIPELINE_RECIPES if "respinquant_gptq" in o]
# the opt-ins that the comment gives for what the default dvc repro leaves off (zero-shot, the rank sweep)
OPT_INS = [o for o in PIPELINE_RECIPES if "respinquant_gptq" not in o]


def test_opt_ins_of_the_default_pipeline_compose():
    """Zero-shot and the rank sweep are off under the default dvc repro (its 30-min budget); the
    comment's overrides turn them on: every task of config.yaml, and a sweep of both low-rank variants."""
    default = compose_pipeline([])
    assert list(default.eval.tasks) == [] and dict(default.rank_sweep.variants) == {}
    assert sorted(o.split("=")[0] for o in OPT_INS) == ["+rank_sweep.variants.respinquant",
                                                        "+rank_sweep.variants.respinquant_chained", "eval.tasks"]
    cfg = compose_pipeline(OPT_INS)
    hand = OmegaConf.load(ROOT / "conf" / "config.yaml")
    assert list(cfg.eval.tasks) == list(hand.eval.tasks)
    assert dict(cfg.rank_sweep.variants) == dict(cfg.approx_variants)


@pytest.mark.parametrize("overrides", [[], ADD_GPTQ_VARIANT], ids=["default", "with_gptq_variant"])
def test_stage_lists_match_variants(overrides):
    """DVC's foreach lists say which variants train or approximate; they must follow ``variants``."""
    cfg = compose_pipeline(overrides)
    v = cfg.variants
    if overrides:
        assert len(overrides) == 6
        assert v.respinquant_gptq.quant.weight_method == "rtn" and v.respinquant_gptq.approx.rank == 32
    assert sorted(cfg.global_variants) == sorted(k for k in v if not v[k].get("global_from")
                                                 and not v[k].get("layerwise_from"))
    layerwise = {k: v[k].get("global_from") or k for k in v
                 if v[k].method.per_layer and v[k].method.transition == "dense"}
    assert dict(cfg.layerwise_variants) == layerwise
    assert dict(cfg.approx_variants) == {k: v[k].layerwise_from for k in v if v[k].method.transition == "low_rank"}
    assert set(cfg.rank_sweep.variants) <= set(cfg.approx_variants)
    for name, source in cfg.rank_sweep.variants.items():  # its DVC dependency
        assert source == cfg.approx_variants[name]
    for name in v:  # every shared source is accepted by the run-time check
        cfg.variant = name
        assert select_variant(cfg)[0] == name


def test_sharing_a_differently_made_set_is_refused():
    cfg = compose_pipeline(["quant@variants.layerwise.quant=w3a3kv3"])
    cfg.variant = "layerwise"
    with pytest.raises(PipelineError, match="global_from=spinquant: its rotations were made differently"):
        select_variant(cfg)


def test_hand_run_names_carry_weights_and_rank():
    cfg = compose_pipeline(["method=respinquant", "quant.weight_method=gptq", "approx.rank=8"])
    cfg.variant = None
    name, chosen = select_variant(cfg)
    assert name.startswith("respinquant_w4a4kv4_gptq_r8-")
    assert chosen.sources["global"] == chosen.sources["layerwise"]
    assert chosen.sources["layerwise"].startswith("respinquant-")
    assert chosen.sources["subspace"].startswith("respinquant_r8-")


def test_calibration_windows_follow_train_profile():
    cfg = compose_pipeline(["train=paper"])
    assert (cfg.calib.n_windows, cfg.calib.seqlen) == (800, 2048)
