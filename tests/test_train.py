"""Rotation training: it lowers the loss, stops cleanly on NaN, and a trained per-layer set stays exact."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from pipeline.model.adapters import adapter_for
from pipeline.infra.errors import PipelineError
from pipeline.methods import prepare_model
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.surgery.weights import replace_norms
from pipeline.train.loop import TrainSpec, TrainState, train_rotations, window_loss
from helpers import LAYERWISE_TRAINED, SPIN, training_setup


def _mean_loss(model, windows) -> float:
    with torch.no_grad():
        return sum(window_loss(model, w).item() for w in windows) / len(windows)


@pytest.mark.parametrize("method", [SPIN, LAYERWISE_TRAINED])
def test_training_lowers_the_quantized_loss(method):
    """On its own batch (all 4 windows every step), at A2/KV2 where rotations matter most."""
    model, rotations, windows = training_setup(method, quant=QuantSpec(a_bits=2, kv_bits=2), outliers=True)
    before = _mean_loss(model, windows)
    state = train_rotations(model, rotations, windows, TrainSpec(steps=12, lr=1.0, batch_size=4), TrainState(),
                            lambda s: None)
    assert state.step == 12 and len(state.losses) == 12
    assert _mean_loss(model, windows) < before - 0.1
    assert rotations.max_orthogonality_error() < 1e-5


def test_nan_loss_stops_with_one_line_naming_the_step():
    model, rotations, windows = training_setup(SPIN)
    saved = []
    with torch.no_grad():
        adapter_for(model).layers(model)[1].mlp.up_proj.linear.parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(PipelineError, match="training loss is nan at step 0: stopped; the last good checkpoint"):
        train_rotations(model, rotations, windows, TrainSpec(steps=3, lr=1.0, batch_size=2), TrainState(),
                        saved.append)
    assert saved == []  # nothing written for the failed step


def test_checkpoint_callback_cadence():
    model, rotations, windows = training_setup(SPIN)
    steps_saved = []
    train_rotations(model, rotations, windows, TrainSpec(steps=5, lr=1.0, batch_size=2, checkpoint_every=2),
                    TrainState(), lambda s: steps_saved.append(s.step))
    assert steps_saved == [2, 4, 5]  # every 2 steps, and the last one


def test_trained_per_layer_set_with_exact_transitions_matches_original_float64(tokens):
    """Quantization off: a trained (float32, exported) per-layer set fused in float64 is exact."""
    model, rotations, windows = training_setup(LAYERWISE_TRAINED)
    train_rotations(model, rotations, windows, TrainSpec(steps=4, lr=1.0, batch_size=2), TrainState(), lambda s: None)
    trained = rotations.export()
    assert max((trained[k] - v.detach()).abs().max().item() for k, v in rotations.as_dict().items()) < 1e-5

    reference, _ = load_model(model_cfg("tiny_llama"))
    reference = reference.double()
    replace_norms(reference, adapter_for(reference))
    fused, _ = load_model(model_cfg("tiny_llama"))
    fused = fused.double()
    prepare_model(fused, LAYERWISE_TRAINED, trained, QuantSpec())
    with torch.no_grad():
        ref = reference(tokens).logits
        err = ((fused(tokens).logits - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-9


class _Killed(Exception):
    pass


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resumed_run_equals_uninterrupted_bit_for_bit(momentum):
    """Resume from the step-3 checkpoint (rotations, step, momentum if any): the step counter must be
    restored even without a momentum buffer, or the QR re-orthogonalisation (every 2 steps) shifts."""
    spec = TrainSpec(steps=6, lr=1.0, batch_size=2, momentum=momentum, reorth_every=2, checkpoint_every=3)
    model, rotations, windows = training_setup(LAYERWISE_TRAINED)
    straight = train_rotations(model, rotations, windows, spec, TrainState(), lambda s: None)
    expected = {k: v.detach().clone() for k, v in rotations.as_dict().items()}

    model, rotations, windows = training_setup(LAYERWISE_TRAINED)
    saved = {}

    def save_then_die(s: TrainState) -> None:  # what rotate.py writes: rotations + state
        saved.update(rotations={k: v.detach().clone() for k, v in rotations.as_dict().items()},
                     state=TrainState(step=s.step, losses=list(s.losses),
                                      momentum={k: v.clone() for k, v in s.momentum.items()}))
        raise _Killed

    with pytest.raises(_Killed):
        train_rotations(model, rotations, windows, spec, TrainState(), save_then_die)
    state = saved["state"]
    assert state.step == 3
    if momentum:
        assert set(state.momentum) == set(rotations.names)
        assert all(v.dtype == torch.float32 for v in state.momentum.values())
    else:
        assert state.momentum == {}  # nothing to save: momentum 0 keeps no buffer

    model, rotations, windows = training_setup(LAYERWISE_TRAINED)
    with torch.no_grad():
        for k, v in rotations.as_dict().items():
            v.copy_(saved["rotations"][k])
    resumed = train_rotations(model, rotations, windows, spec, state, lambda s: None)
    assert resumed.losses == straight.losses
    assert all(torch.equal(v.detach(), expected[k]) for k, v in rotations.as_dict().items())
