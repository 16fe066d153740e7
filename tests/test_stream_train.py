"""Streamed rotation training: the same losses and rotations as the whole-model path, one decoder layer
materialised at a time, the spill folder gone afterwards."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from pipeline.model.adapters import adapter_for
from pipeline.methods import make_rotations, prepare_base
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.train.streamed import stream_for_training
from pipeline.model.streaming import is_materialized, open_model
from pipeline.train.loop import TrainSpec, TrainState, train_rotations
from pipeline.train.trainable import TrainableRotations, enable_checkpointing, parametrize_rotations
from helpers import A4, LAYERWISE_TRAINED, SPIN, one_line_error, run_stage

SPEC = TrainSpec(steps=3, lr=1.0, batch_size=2)
ONE_STEP = TrainSpec(steps=1, lr=1.0, batch_size=2)


def _windows() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _whole(name: str, method, quant: QuantSpec, checkpointing: bool, spec: TrainSpec = SPEC):
    model, _ = load_model(model_cfg(name))
    adapter = prepare_base(model, method, quant)
    if checkpointing:
        enable_checkpointing(model)
    rotations = TrainableRotations(make_rotations(method, model))
    parametrize_rotations(model, adapter, rotations, quant)
    state = train_rotations(model, rotations, _windows(), spec, TrainState(), lambda s: None)
    return state, rotations.export()


def _streamed(name: str, method, quant: QuantSpec, tmp_path, on_forward=None, spec: TrainSpec = SPEC):
    skeleton, _, source = open_model(model_cfg(name), torch.float32)
    rotations = TrainableRotations(make_rotations(method, skeleton))
    with stream_for_training(skeleton, source, method, quant, rotations, "cpu", tmp_path) as model:
        assert len(list(tmp_path.glob(".spill-*/layer-*.safetensors"))) == model.config.num_hidden_layers
        if on_forward is not None:
            for layer in adapter_for(model).layers(model):  # inside the layer: forward and recompute
                layer.mlp.register_forward_pre_hook(lambda m, args: on_forward(model, m))
        state = train_rotations(model, rotations, _windows(), spec, TrainState(), lambda s: None)
    return state, rotations.export()


@pytest.mark.parametrize("name,method,quant,spec", [
    ("tiny_llama", SPIN, A4, SPEC),
    ("tiny_llama", LAYERWISE_TRAINED, A4, SPEC),
    # biases, and RTN weights in training: one step, since later 4-bit weight roundings flip on the
    # rounding differences of the embedding/lm_head rotations (activations instead of weights)
    ("tiny_qwen2", LAYERWISE_TRAINED, QuantSpec(w_bits=4, a_bits=4, kv_bits=4, w_mse_clip=False), ONE_STEP),
])
def test_streamed_training_equals_whole_model(tmp_path, name, method, quant, spec):
    """Same losses and trained rotations as the whole-model path, with and without its checkpointing."""
    streamed, got = _streamed(name, method, quant, tmp_path, spec=spec)
    for checkpointing in (True, False):
        whole, want = _whole(name, method, quant, checkpointing, spec)
        assert streamed.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-6)
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    init = make_rotations(method, open_model(model_cfg(name), torch.float32)[0])
    assert max((got[k] - v).abs().max().item() for k, v in init.items()) > 1e-4  # it did train
    assert not list(tmp_path.glob(".spill-*"))  # the spill folder is removed


def test_one_decoder_layer_materialised_at_a_time(tmp_path):
    """Whenever a layer runs (forward or backward's recompute), it is the only one holding weights;
    the embedding and lm_head stay loaded."""
    seen = []

    def probe(model, layer):
        adapter = adapter_for(model)
        loaded = [is_materialized(m) for m in adapter.layers(model)]
        seen.append(sum(loaded))
        assert is_materialized(adapter.embedding(model)) and is_materialized(adapter.lm_head(model))

    _streamed("tiny_llama", LAYERWISE_TRAINED, A4, tmp_path, on_forward=probe)
    n_layers = model_cfg("tiny_llama").config.num_hidden_layers
    # forward + recompute per training window, then one forward per window of the final-loss check
    assert len(seen) == SPEC.steps * SPEC.batch_size * n_layers * 2 + SPEC.batch_size * n_layers
    assert set(seen) == {1}  # only the running layer holds weights


def test_spill_folder_removed_on_error(tmp_path):
    skeleton, _, source = open_model(model_cfg("tiny_llama"), torch.float32)
    rotations = TrainableRotations(make_rotations(SPIN, skeleton))
    with pytest.raises(RuntimeError, match="boom"):
        with stream_for_training(skeleton, source, SPIN, A4, rotations, "cpu", tmp_path):
            raise RuntimeError("boom")
    assert not list(tmp_path.glob(".spill-*"))


def test_stage_streams_and_gives_the_whole_model_rotations(tmp_path):
    """``train.stream=true`` through the stage script (both training stages of the exact layer-wise
    method) writes the rotations that ``train.stream=false`` writes from the same global set, and
    leaves no spill folder."""
    import shutil

    from pipeline.infra.artifacts import load_tensors

    common = ["+model=tiny_llama", "method=layerwise", "calib.n_windows=2", "calib.seqlen=32",
              "calib.stats_windows=1", "train.steps=2", "train.batch_size=1", "train.checkpoint_every=0"]
    env = {"RSQ_CACHE_DIR": str(tmp_path / "cache")}
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    streamed.mkdir()
    assert run_stage(streamed, "calibrate.py", *common, env=env).returncode == 0
    for stage in ("global", "layerwise"):
        proc = run_stage(streamed, "train_rotation.py", *common, f"rotation_stage={stage}", "train.stream=true", env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.copytree(streamed, whole)
    proc = run_stage(whole, "train_rotation.py", *common, "rotation_stage=layerwise", "train.stream=false", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sets = [load_tensors(next((run / "a" / "rotations").glob("*/layerwise.safetensors")))[0] for run in (streamed, whole)]
    assert sets[0].keys() == sets[1].keys()
    assert max((sets[0][k] - sets[1][k]).abs().max().item() for k in sets[0]) < 1e-5
    assert not list((tmp_path / "cache" / "spill").glob(".spill-*"))
    one_line_error(run_stage(tmp_path, "train_rotation.py", *common, "train.stream=maybe"),
                    "error: train.stream='maybe': choose true, false or auto")
