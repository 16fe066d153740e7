"""No silent wrong results: non-finite settings, tensors and results are refused in one line, and
settings every stage shares are checked before any work (issue 2/6; the cases of
``shared/reviews/reliability.md``)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import model_cfg
from pipeline.infra import artifacts, paths
from pipeline.infra.artifacts import save_tensors, write_csv, write_json
from pipeline.eval.data import eval_windows
from pipeline.infra.errors import PipelineError
from pipeline.eval.perplexity import _ppl
from pipeline.quant.quantizers import QuantSpec
from pipeline.train.loop import TrainSpec, TrainState, train_rotations
from helpers import QUAROT, SPIN, W4A4, hand_run, one_line_error, prepared_model, run_stage, training_setup


@pytest.mark.parametrize("kwargs,expected", [
    ({"lr": math.nan}, "train.lr=nan: must be a finite number > 0"),
    ({"lr": math.inf}, "train.lr=inf: must be a finite number > 0"),
    ({"momentum": math.nan}, "train.momentum=nan: must be a finite number in [0, 1)"),
    ({"momentum": 1.0}, "train.momentum=1.0: must be a finite number in [0, 1)"),
    ({"steps": 0}, "train.steps=0: must be an integer >= 1"),
    ({"batch_size": 0}, "train.batch_size=0: must be an integer >= 1"),
    ({"seed": "abc"}, "train.seed='abc': must be an integer >= 0"),
])
def test_train_spec_refuses_non_finite_and_out_of_range(kwargs, expected):
    with pytest.raises(PipelineError) as err:
        TrainSpec(**{"steps": 2, "lr": 1.0, **kwargs})
    assert str(err.value) == expected


def test_gptq_damp_must_be_finite():
    for damp in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match=r"quant.gptq_damp=.*: must be a finite number > 0"):
            QuantSpec(gptq_damp=damp)


def test_non_finite_tensors_and_values_are_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "FINITE_CHUNK", 7)  # the chunked check finds a NaN past the first chunk
    bad = torch.zeros(5, 5)
    bad[4, 4] = math.nan
    with pytest.raises(PipelineError, match=r"^R1 holds NaN or inf values: .*r.safetensors is not written"):
        save_tensors(tmp_path / "r.safetensors", {"ok": torch.zeros(3), "R1": bad}, {"fingerprint": "f"})
    with pytest.raises(PipelineError, match=r"^stats.act_absmax_max is inf: .*c.json is not written"):
        write_json(tmp_path / "c.json", {"stats": {"act_absmax_max": math.inf}})
    with pytest.raises(PipelineError, match=r"^\[1\].ppl is nan: .*t.csv is not written"):
        write_csv(tmp_path / "t.csv", [{"ppl": 1.0}, {"ppl": math.nan}])
    assert list(tmp_path.iterdir()) == []
    save_tensors(tmp_path / "ints.safetensors", {"ids": torch.arange(4)}, {"fingerprint": "f"})  # integers pass


@pytest.mark.parametrize("nll,expected", [
    (math.nan, "the mean NLL is nan: the model computes non-finite logits"),
    (math.inf, "the mean NLL is inf: the model computes non-finite logits"),
    (800.0, "the mean NLL is 800.0 nats: its perplexity overflows float64"),
])
def test_non_finite_or_overflowing_perplexity_is_an_error(nll, expected):
    with pytest.raises(PipelineError, match=expected):
        _ppl(nll)
    assert _ppl(math.log(20.0)) == pytest.approx(20.0)


def test_max_windows_zero_or_negative_is_refused():
    ids = torch.arange(100)
    for bad in (0, -1):
        with pytest.raises(PipelineError, match=f"max_windows={bad}: must be null"):
            eval_windows(ids, 10, bad)
    assert eval_windows(ids, 10, None).shape == (10, 10) and eval_windows(ids, 10, 3).shape == (3, 10)


def _tiny_training():
    return training_setup(SPIN)


def test_training_stops_when_an_update_makes_the_rotations_non_finite(monkeypatch):
    """A NaN update is caught before the step counts: nothing is checkpointed."""
    from pipeline.rotation import cayley

    model, rotations, windows = _tiny_training()
    real = cayley.CayleySGD.step

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0][0, 0] = math.nan
        return out

    monkeypatch.setattr(cayley.CayleySGD, "step", poisoned)
    saved = []
    with pytest.raises(PipelineError, match=r"the rotations are not finite after step 0: stopped; the last good "
                                            r"checkpoint \(step 0\) is kept"):
        train_rotations(model, rotations, windows, TrainSpec(steps=2, lr=1.0, batch_size=2, checkpoint_every=1),
                        TrainState(), saved.append)
    assert saved == []


def test_training_checks_the_loss_after_the_last_step():
    """The last update is checked too: a loss that is NaN after it stops the stage (the set is not
    published); here the last checkpoint callback poisons a weight, as a diverged update would."""
    from pipeline.model.adapters import adapter_for

    model, rotations, windows = _tiny_training()

    def poison(state):
        if state.step == 2:
            with torch.no_grad():
                adapter_for(model).layers(model)[0].mlp.up_proj.linear.parametrizations.weight.original.fill_(math.nan)

    with pytest.raises(PipelineError, match=r"the loss after the last step \(2\) is nan: the trained rotations are "
                                            r"not published"):
        train_rotations(model, rotations, windows, TrainSpec(steps=2, lr=1.0, batch_size=2, checkpoint_every=1),
                        TrainState(), poison)


@pytest.mark.parametrize("script,override,expected,output", [
    ("train_rotation.py", "train.lr=nan", "error: train.lr=nan: must be a finite number > 0", "rotations"),
    ("train_rotation.py", "train.momentum=nan", "error: train.momentum=nan: must be a finite number", "rotations"),
    ("train_rotation.py", "train.steps=0", "error: train.steps=0: must be an integer >= 1", "rotations"),
    ("fuse.py", "quant.gptq_damp=nan", "error: quant.gptq_damp=nan: must be a finite number > 0", "fused"),
    ("calibrate.py", "seed=abc", "error: seed='abc': must be an integer in 0..9223372036854775807", "calib"),
    ("calibrate.py", "calib.seqlen=0", "error: calib.seqlen=0: must be an integer >= 2", "calib"),
    ("eval.py", "eval.max_windows=0", "error: eval.max_windows=0: must be null or an integer >= 1", "eval"),
])
def test_stage_settings_refused_before_any_work(tmp_path, script, override, expected, output):
    one_line_error(run_stage(tmp_path, script, "+model=tiny_llama", "method=spinquant", override), expected)
    assert not (tmp_path / "a" / output).exists() and not (tmp_path / "m").exists()


def test_artifacts_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "a").write_text("not a folder")
    one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama"), "is a file, not a folder")


def test_non_utf8_calibration_text_names_the_file(tmp_path):
    data = tmp_path / "data" / "enwiki-gensim"
    data.mkdir(parents=True)
    (data / "enwiki.txt").write_bytes(bytes(range(128, 256)) * 64)
    proc = run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", "data=enwiki", f"data.dir={tmp_path / 'data'}")
    one_line_error(proc, "enwiki.txt is not UTF-8 text (byte 0: invalid start byte)")
    assert not (tmp_path / "a" / "calib").exists()


def test_a_checkpoint_is_only_evaluated_as_what_it_is(tmp_path):
    """Another model's config, another method or other bit-widths than the checkpoint records are
    refused in one line: results are never labelled with what the checkpoint is not."""
    from dataclasses import replace

    from pipeline.export.checkpoint import check_made_for, save_quantized

    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint, {"model_name": "tiny_llama"})
    assert check_made_for(tmp_path / "ckpt", model_cfg("tiny_llama"), QUAROT, W4A4)["method"]["name"] == "quarot"
    with pytest.raises(PipelineError, match=r"was made for model tiny_llama \(fingerprint .*\), not for model=tiny_qwen2"):
        check_made_for(tmp_path / "ckpt", model_cfg("tiny_qwen2"), QUAROT, W4A4)
    renamed = model_cfg("tiny_llama")
    renamed.name = "smollm2_135m"  # same sizes, another name: still refused
    with pytest.raises(PipelineError, match="not for model=smollm2_135m"):
        check_made_for(tmp_path / "ckpt", renamed, QUAROT, W4A4)
    with pytest.raises(PipelineError, match=r"holds another method than the configured one: name=quarot \(config: rtn\)"):
        check_made_for(tmp_path / "ckpt", model_cfg("tiny_llama"), replace(QUAROT, name="rtn"), W4A4)
    with pytest.raises(PipelineError, match=r"holds another quant .*a_bits=4 \(config: 16\)"):
        check_made_for(tmp_path / "ckpt", model_cfg("tiny_llama"), QUAROT, replace(W4A4, a_bits=16, kv_bits=16))


def test_eval_stage_refuses_another_models_checkpoint(tmp_path):
    common = ["method=quarot", "quant=w16a16", "calib.n_windows=2", "calib.seqlen=32", "calib.stats_windows=1"]
    for script in ("calibrate.py", "train_rotation.py", "fuse.py"):
        assert run_stage(tmp_path, script, "+model=tiny_qwen2", *common).returncode == 0
    # hand runs of two models never share a path: put qwen2's checkpoint where tiny_llama's eval looks
    qwen2, llama = (hand_run(tmp_path, f"+model={m}", *common) for m in ("tiny_qwen2", "tiny_llama"))
    shutil.copytree(paths.fused(qwen2[1], qwen2[0]), paths.fused(llama[1], llama[0]))
    one_line_error(run_stage(tmp_path, "eval.py", "+model=tiny_llama", *common, "eval.tasks=[]"),
                    "was made for model tiny_qwen2")
    assert not (tmp_path / "m" / "eval").exists()

    # the same checkpoint on a user's own text (eval.corpus): same windowing, keys corpus_*
    corpus = tmp_path / "domain.txt"
    corpus.write_text("\ufeffFirst line of my domain.\r\n\r\n" + "More text about the domain. " * 200 + "\n")
    proc = run_stage(tmp_path, "eval.py", "+model=tiny_qwen2", *common, "eval.tasks=[]", f"eval.corpus={corpus}",
                  "eval.seqlen=64", "eval.max_windows=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "m" / "eval").glob("quarot_w16a16-*.json")  # named by its setting's tag
    result = json.loads(path.read_text())
    assert result["corpus"] == str(corpus) and result["corpus_windows"] == 3 and result["corpus_ppl"] > 1
    assert "wikitext2_ppl" not in result
    # the result records the whole setting it was made under (the group size too), its tag names the file
    assert result["config"]["quant"]["w_group_size"] == 0 and result["config"]["model"]["name"] == "tiny_qwen2"
    assert path.stem == f"{qwen2[0]}" and path.stem.endswith(result["setting_tag"])
    windows = json.loads((tmp_path / "m" / "eval_windows" / path.name).read_text())
    assert len(windows["window_nll"]) == 3 and windows["text_sha256"] == result["corpus_text_sha256"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for path, message in ((tmp_path / "none.txt", "no such file"), (empty, "the file holds no text")):
        one_line_error(run_stage(tmp_path, "eval.py", "+model=tiny_qwen2", *common, f"eval.corpus={path}"),
                        f"eval.corpus={path}: {message}")


def test_unsupported_family_is_refused_before_loading(tmp_path):
    """A Gemma-2 folder (config only: nothing past the config is read) is one line, for the streamed
    stages and the whole-model loader alike."""
    from transformers import AutoConfig

    from pipeline.model.load import load_model

    folder = tmp_path / "gemma2"
    AutoConfig.for_model("gemma2", vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32).save_pretrained(folder)
    one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", f"model.path={folder}"),
                    "error: model family model_type='gemma2' cannot be rotated: it normalises each block's "
                    "output before the residual add")
    assert not (tmp_path / "a").exists()
    cfg = model_cfg("tiny_llama")
    cfg.path = str(folder)
    with pytest.raises(PipelineError, match="model_type='gemma2' cannot be rotated"):
        load_model(cfg)


@pytest.mark.parametrize("model_type,why", [
    ("olmo2", "normalises each block's output before the residual add"),
    ("gemma3_text", "normalises each block's output before the residual add"),
    ("gpt_neox", "uses LayerNorm, which subtracts the mean"),
    ("phi", "uses LayerNorm, which subtracts the mean"),
    ("mamba", None),
])
def test_families_that_cannot_hold_a_rotation_say_why(model_type, why):
    """Refused from the config alone; a family with no adapter and no known obstacle is 'unsupported'."""
    from transformers import AutoConfig

    from pipeline.model.adapters import check_config

    with pytest.raises(PipelineError) as info:
        check_config(AutoConfig.for_model(model_type))
    message = str(info.value)
    assert "\n" not in message
    if why is None:
        assert message.startswith("unsupported model family model_type='mamba'; supported: llama")
        assert "qwen3 (Qwen3ForCausalLM)" in message
    else:
        assert message.startswith(f"model family model_type={model_type!r} cannot be rotated: it {why}")


def test_checkpoint_code_never_runs(tmp_path):
    """A model folder whose config maps to its own Python (``auto_map``) gets one line, no
    "run the custom code? [y/N]" prompt, and its code never runs (it would write a marker file)."""
    import json

    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_model", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_model'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    for script in ("calibrate.py", "train_rotation.py"):
        proc = run_stage(tmp_path, script, "+model=tiny_llama", f"model.path={folder}", "method=spinquant")
        one_line_error(proc, "remote code is never run")
    assert not marker.exists()


def test_edited_hf_config_or_tokenizer_of_a_checkpoint_is_refused(tmp_path):
    """config.json (rms_norm_eps, rope_theta: outside the fingerprint) and the tokenizer files are
    hashed into the index like the shards: an edit is one line naming the file."""
    import json

    from pipeline.export.checkpoint import load_quantized, save_quantized

    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    load_quantized(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    edited = json.loads(config.read_text())
    edited["rms_norm_eps"] = 1e-2
    config.write_text(json.dumps(edited))
    with pytest.raises(PipelineError, match=r"config.json is missing or does not match the sha256 recorded"):
        load_quantized(tmp_path / "ckpt")


def test_disk_full_is_one_line():
    """The two shapes a full disk takes (an OSError, safetensors' SafetensorError) are named in one line."""
    import errno

    from safetensors import SafetensorError

    from pipeline.infra.config import _os_failure

    assert _os_failure(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == "No space left on device (/x/y)"
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _os_failure(full) == "No space left on device (os error 28)"
    assert _os_failure(ValueError("other")) is None and _os_failure(OSError(errno.EIO, "io")) is None
