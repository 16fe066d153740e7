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
    assert name == "rtn_w3a3kv3" and chosen.quant.a_bits == 3


def test_every_quant_preset_is_valid():
    from pipeline.methods import quant_spec

    for path in (ROOT / "conf" / "quant").glob("*.yaml"):
        spec = quant_spec(OmegaConf.load(path))
        assert path.stem == f"w{spec.w_bits}a{spec.a_bits}" + ("" if spec.kv_bits == 16 else f"kv{spec.kv_bits}")


# The `dvc exp run -S '...'` overrides that conf/pipeline.yaml's comment gives for adding the GPTQ
# ReSpinQuant variant to dvc repro (README "What runs"), read from the file so the recipe is what is tested.
ADD_GPTQ_VARIANT = re.findall(r"-S '([^']+)'", (ROOT / "conf" / "pipeline.yaml").read_text())


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
    assert set(cfg.rank_sweep.variants) == {"respinquant", "respinquant_chained"}
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
    assert name == "respinquant_w4a4kv4_gptq_r8"
    assert chosen.sources == {"global": "respinquant_w4a4kv4", "layerwise": "respinquant_w4a4kv4",
                              "subspace": "respinquant_w4a4kv4_r8"}  # shared by the RTN and GPTQ fuses


def test_calibration_windows_follow_train_profile():
    cfg = compose_pipeline(["train=paper"])
    assert (cfg.calib.n_windows, cfg.calib.seqlen) == (800, 2048)
