"""Bad input gets one clear line and a non-zero exit, never a traceback, never a half-written artifact."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, model_cfg
from pipeline.infra.artifacts import load_tensors, save_tensors
from pipeline.infra import paths
from pipeline.infra.errors import PipelineError
from pipeline.infra.settings import SETTING_KEY, record, rotation_setting
from helpers import hand_run, one_line_error, run_stage


def test_no_model_selected(tmp_path):
    one_line_error(run_stage(tmp_path, "calibrate.py"), "no model selected: add +model=NAME")


def test_unknown_model(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=no_such_model")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'model/no_such_model'" in proc.stderr


def test_bad_override(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "eval.seqlenn=3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not override 'eval.seqlenn'" in proc.stderr


def test_bad_quant_value(tmp_path):
    proc = run_stage(tmp_path, "fuse.py", "+model=tiny_llama", "quant.a_bits=12")
    one_line_error(proc, "quant.a_bits=12: must be 2..8 or 16 (off)")


def test_missing_data_dir(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", f"data.dir={tmp_path / 'nowhere'}")
    one_line_error(proc, "does not exist (set data.dir= or RSQ_DATA_DIR")
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_no_data_dir_and_hub_off(tmp_path):
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", env={"RSQ_DATA_DIR": ""})
    one_line_error(proc, "needs a data dir")


def test_unusable_mlflow_store_is_one_line(tmp_path):
    """MLflow 3 refuses its file store: the stage says which URI and what to use, before any work."""
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", f"paths.artifacts={tmp_path / 'a'}",
                     f"mlflow.tracking_uri=file:{tmp_path / 'mlruns'}")
    one_line_error(proc, f"mlflow.tracking_uri=file:{tmp_path / 'mlruns'}: MLflow cannot use this store")
    assert not (tmp_path / "a").exists()


def test_unsupported_architecture(tmp_path):
    """A random-init config of a family the pipeline cannot rotate is refused from its config, saying why."""
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "model.config.model_type=gpt2")
    one_line_error(proc, "model family model_type='gpt2' cannot be rotated: it uses LayerNorm, which subtracts the mean")


def test_unsupported_model_class_is_one_line():
    """A model built elsewhere, of a class with no adapter, is one line naming the supported classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model.adapters import adapter_for

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(PipelineError, match="unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, "
                                            "MistralForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, Phi3ForCausalLM, "
                                            "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        adapter_for(model)


def test_llama3_composes_and_prints(tmp_path):
    proc = run_stage(tmp_path, "train_rotation.py", "+model=llama3", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size: 4096" in proc.stdout and "meta-llama/Meta-Llama-3-8B" in proc.stdout


def test_llama3_without_weights_is_one_line(tmp_path):
    proc = run_stage(tmp_path, "train_rotation.py", "+model=llama3", env={"HF_HOME": str(tmp_path / "hf")})
    one_line_error(proc, "'meta-llama/Meta-Llama-3-8B' is neither a local folder nor a model in the HF cache")


def test_unknown_variant(tmp_path):
    proc = run_stage(tmp_path, "fuse.py", "+model=tiny_llama", "variant=nope")
    one_line_error(proc, "variant=nope is not in variants")


def test_artifact_for_another_model_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    save_tensors(path, {"R1": torch.eye(4)}, {"fingerprint": "aaaa", "model": "tiny_llama"})
    with pytest.raises(PipelineError, match="made for model tiny_llama \\(fingerprint aaaa\\), not this one"):
        load_tensors(path, fingerprint="bbbb")


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_artifact_is_one_line(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="is not a readable safetensors file") as info:
        load_tensors(path)
    assert "\n" not in str(info.value)


def test_truncated_artifact_is_one_line(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.randn(64, 64)}, {"fingerprint": "f"})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PipelineError, match="is not a readable safetensors file"):
        load_tensors(path)


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError):
        save_tensors(path, {"x": torch.zeros(2)}, {"no": "fingerprint"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,expected", [
    ("calib.stats_windows=0", "calib.stats_windows=0: must be 1..calib.n_windows"),
    ("calib.seqlen=1024", "calib.seqlen=1024 exceeds the model's max_position_embeddings=512"),
])
def test_bad_calibration_settings(tmp_path, override, expected):
    one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", override), expected)
    assert not (tmp_path / "a").exists()


def test_mistyped_quant_value(tmp_path):
    one_line_error(run_stage(tmp_path, "fuse.py", "+model=tiny_llama", "quant.w_bits=four"),
                    "quant.w_bits=four: must be 2..8 or 16 (off)")


# --- approximate / fuse of ReSpinQuant ---

RESPIN = ("+model=tiny_llama", "method=respinquant")


@pytest.mark.parametrize("override,expected", [
    ("approx.rank=193", "approx.rank=193 exceeds the hidden size 192 of tiny_llama"),
    ("approx.rank=-1", "approx.rank=-1: must be an integer >= 0"),
    ("approx.rank=most", "approx.rank=most: give an integer >= 0, 'full' or 'adaptive'"),
    ("approx.energy=0", "approx.energy=0: must be in (0, 1]"),
])
def test_bad_rank_is_one_line(tmp_path, override, expected):
    one_line_error(run_stage(tmp_path, "approximate.py", *RESPIN, override), expected)
    assert not (tmp_path / "a").exists()


def test_approximate_needs_a_low_rank_method(tmp_path):
    one_line_error(run_stage(tmp_path, "approximate.py", "+model=tiny_llama", "method=layerwise"),
                    "method layerwise has no low-rank transitions: approximate does not apply")


def _tiny_per_layer_set(tmp_path, fingerprint_of: str = "tiny_llama") -> None:
    """A per-layer rotation set where the hand-run respinquant stages look for it."""
    from pipeline.methods import MethodSpec, make_rotations
    from pipeline.model.load import load_model, model_fingerprint

    model, _ = load_model(model_cfg(fingerprint_of))
    method = MethodSpec(name="respinquant", r1="hadamard", r2="hadamard", per_layer=True, transition="low_rank")
    save_tensors(_respin_set(tmp_path), make_rotations(method, model),
                 {"fingerprint": model_fingerprint(model), "model": fingerprint_of,
                  SETTING_KEY: record(rotation_setting(hand_run(tmp_path, *RESPIN)[1], "layerwise"))})


def _respin_set(tmp_path, *overrides: str):
    """Where the hand-run respinquant stages (with ``overrides``) read their per-layer set."""
    cfg = hand_run(tmp_path, *RESPIN, *overrides)[1]
    return paths.rotations(cfg, cfg.sources["layerwise"], "layerwise")


def _respin_subspace(tmp_path, *overrides: str):
    cfg = hand_run(tmp_path, *RESPIN, *overrides)[1]
    return paths.subspace(cfg, cfg.sources["subspace"])


def test_rotations_for_another_model_refused_by_approximate(tmp_path):
    _tiny_per_layer_set(tmp_path, fingerprint_of="tiny_qwen2")
    one_line_error(run_stage(tmp_path, "approximate.py", *RESPIN), "was made for model tiny_qwen2")
    assert not _respin_subspace(tmp_path).exists()


def test_truncated_rotations_refused_by_approximate(tmp_path):
    _tiny_per_layer_set(tmp_path)
    path = _respin_set(tmp_path)
    path.write_bytes(path.read_bytes()[:-1000])
    one_line_error(run_stage(tmp_path, "approximate.py", *RESPIN), "is not a readable safetensors file")


def test_subspace_for_other_rotations_or_model_refused_by_fuse(tmp_path):
    _tiny_per_layer_set(tmp_path)
    proc = run_stage(tmp_path, "approximate.py", *RESPIN, "approx.rank=4")
    assert proc.returncode == 0, proc.stderr
    sub = _respin_subspace(tmp_path, "approx.rank=4")
    assert sub.is_file()
    tensors, meta = load_tensors(sub)
    save_tensors(sub, tensors, {**meta, "rotations": "0123456789abcdef"})
    one_line_error(run_stage(tmp_path, "fuse.py", *RESPIN, "approx.rank=4"),
                    "was made from other rotations: rerun the approximate stage")
    save_tensors(sub, tensors, {**meta, "fingerprint": "ffff", "model": "another"})
    one_line_error(run_stage(tmp_path, "fuse.py", *RESPIN, "approx.rank=4"), "was made for model another")
    assert not (tmp_path / "a" / "fused").exists()


def test_rank_sweep_needs_a_low_rank_method(tmp_path):
    one_line_error(run_stage(tmp_path, "rank_sweep.py", "+model=tiny_llama", "method=layerwise"),
                    "rank_sweep needs a low-rank (respinquant) variant; layerwise_w4a4kv4-")


def test_rank_sweep_streamed_equals_in_memory_and_bad_stream_is_one_line(tmp_path):
    """``rank_sweep.stream=true`` (each rank fused to a temporary checkpoint, ppl layer by layer)
    writes the perplexities of the in-memory fuse."""
    import csv

    _tiny_per_layer_set(tmp_path)
    one_line_error(run_stage(tmp_path, "rank_sweep.py", *RESPIN, "rank_sweep.stream=maybe"),
                    "error: rank_sweep.stream='maybe': choose true, false or auto")
    ppl = {}
    for stream in ("true", "false"):
        proc = run_stage(tmp_path, "rank_sweep.py", *RESPIN, "eval.seqlen=64", "rank_sweep.ranks=[8]",
                      "rank_sweep.max_windows=1", f"rank_sweep.stream={stream}",
                      env={"RSQ_CACHE_DIR": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr[-2000:]
        (table,) = (tmp_path / "m" / "rank_sweep").glob("*.csv")
        rows = list(csv.DictReader(table.open()))
        assert {r["weights"] for r in rows} == {"rtn"}  # rank_sweep.weight_method's default
        ppl[stream] = [(r["rank"], r["wikitext2_ppl"]) for r in rows]
    assert len(ppl["true"]) == 1 and ppl["true"] == ppl["false"]


def test_rank_sweep_refuses_a_rank_above_hidden_before_fusing(tmp_path):
    _tiny_per_layer_set(tmp_path)
    one_line_error(run_stage(tmp_path, "rank_sweep.py", *RESPIN, "eval.seqlen=128", "rank_sweep.ranks=[0,193]"),
                    "rank_sweep.ranks: 193 exceeds the hidden size 192")
    assert not (tmp_path / "m" / "rank_sweep").exists()


def test_report_without_eval_metrics_is_one_line(tmp_path):
    one_line_error(run_stage(tmp_path, "report.py", "-cd", str(ROOT), "-cn", "params"),
                    "eval/fp16.json is missing: run the eval stage of variant fp16 first")
    one_line_error(run_stage(tmp_path, "report.py", "+model=tiny_llama"),
                    "report compares the variants of conf/pipeline.yaml")
    assert not (tmp_path / "results.md").exists()


@pytest.mark.parametrize("override,expected", [
    ("eval.tasks=[arc_easy,nope]", "unknown zero-shot task(s) ['nope']"),
    ("eval.limit=0", "zero-shot limit must be a positive integer or None (all items), got 0"),
])
def test_bad_zeroshot_settings_fail_before_any_model_work(tmp_path, override, expected):
    one_line_error(run_stage(tmp_path, "eval.py", "+model=tiny_llama", override), expected)
    assert not (tmp_path / "m").exists()


def test_hand_run_respinquant_training_runs(tmp_path):
    """method=respinquant by hand: its global stage trains like layerwise's (it used to stop with
    'transition=low_rank needs per_layer=true')."""
    common = ["+model=tiny_llama", "method=respinquant", "calib.n_windows=2", "calib.seqlen=64",
              "calib.stats_windows=1", "train.steps=1", "train.batch_size=1", "train.checkpoint_every=0"]
    assert run_stage(tmp_path, "calibrate.py", *common).returncode == 0
    proc = run_stage(tmp_path, "train_rotation.py", *common)
    assert proc.returncode == 0, proc.stderr[-1500:]
    cfg = hand_run(tmp_path, *common)[1]
    assert paths.rotations(cfg, cfg.sources["global"], "global").is_file()
