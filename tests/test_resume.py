"""A killed rotation training resumes from its last checkpoint and ends where an uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT
from helpers import mlflow_uri
from pipeline.infra import paths
from pipeline.infra.artifacts import load_tensors
from pipeline.infra.config import select_variant
from pipeline.steps import calibrate, rotate
from pipeline.train import loop as train_module


def _cfg(tmp_path, tag: str):
    overrides = ["+model=tiny_llama", "method=spinquant", "train.windows=4", "train.seqlen=48", "train.steps=4",
                 "train.batch_size=2", "train.checkpoint_every=1", "calib.stats_windows=1",
                 f"paths.artifacts={tmp_path / tag / 'a'}", f"paths.metrics={tmp_path / tag / 'm'}",
                 f"mlflow.tracking_uri={mlflow_uri(tmp_path)}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _set_path(cfg, folder=paths.rotations):
    """Where the hand run of ``cfg`` writes its global set (``paths.train_checkpoint``: its checkpoint)."""
    return folder(cfg, select_variant(cfg)[1].sources["global"], "global")


def _result(tmp_path, tag: str) -> dict[str, torch.Tensor]:
    return load_tensors(_set_path(_cfg(tmp_path, tag)))[0]


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch, capsys):
    straight = _cfg(tmp_path, "straight")
    calibrate.run(straight)
    rotate.run(straight)

    killed = _cfg(tmp_path, "killed")
    calibrate.run(killed)
    real = train_module.train_rotations

    def killed_after_two_steps(model, rotations, windows, spec, state, save_checkpoint, desc=""):
        def save_then_die(s):
            save_checkpoint(s)
            if s.step == 2:
                raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint

        return real(model, rotations, windows, spec, state, save_then_die, desc)

    monkeypatch.setattr(rotate, "train_rotations", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        rotate.run(killed)
    ckpt = _set_path(killed, paths.train_checkpoint)
    assert ckpt.is_file()
    assert not _set_path(killed).exists()

    monkeypatch.setattr(rotate, "train_rotations", real)
    rotate.run(killed)
    assert "at step 2" in capsys.readouterr().out
    assert not ckpt.exists()  # a finished run removes its checkpoint
    a, b = _result(tmp_path, "straight"), _result(tmp_path, "killed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
