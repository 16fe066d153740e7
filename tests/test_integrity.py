"""Upstream artifacts verified before use: rotation sets must be rotations, the model fingerprint covers
the weights (not only their shapes), and a checkpoint's codes must fit the bit-width it records.
(Digests of the saved tensors: tests/test_artifacts.py.)"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import model_cfg
from helpers import QUAROT, W4A4, hand_run, one_line_error, prepared_model, run_stage
from pipeline import load_quantized
from pipeline.export.checkpoint import CONFIG, INDEX, save_quantized
from pipeline.infra import paths
from pipeline.infra.artifacts import load_tensors, save_tensors
from pipeline.infra.errors import PipelineError
from pipeline.methods import ORTHO_TOL, check_rotations
from pipeline.model.load import build_random_model, byte_tokenizer, load_model, model_fingerprint
from pipeline.model.streaming import open_model


def test_a_set_that_is_not_a_rotation_is_refused_in_one_line():
    """A float32 rotation passes (its error is ~1e-7, far under the bound); the same set with R1 off by
    0.1% in scale, or with one entry moved by 1e-3, does not."""
    model, _ = load_model(model_cfg("tiny_llama"))
    from pipeline.methods import make_rotations

    good = {k: v.to(torch.float32) for k, v in make_rotations(QUAROT, model).items()}
    check_rotations(good, QUAROT, model)
    for edit in ("scale", "entry"):
        bad = dict(good)
        bad["R1"] = good["R1"] * 1.001 if edit == "scale" else good["R1"].clone().index_put_(
            (torch.tensor([3]), torch.tensor([5])), torch.tensor(1e-3), accumulate=True)
        with pytest.raises(PipelineError, match=r"rotation R1 is not orthogonal: .* > 1e-04") as info:
            check_rotations(bad, QUAROT, model)
        assert "\n" not in str(info.value)
    assert ORTHO_TOL == 1e-4


def _folder_model(folder, seed: int) -> None:
    cfg = dict(model_cfg("tiny_llama"))
    model, _ = build_random_model({**cfg, "seed": seed}, torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def test_fingerprint_covers_the_weights_and_agrees_between_whole_and_streamed(tmp_path):
    cfg = model_cfg("tiny_llama")
    seed7 = cfg.copy()
    seed7.seed = 7
    whole, streamed = load_model(cfg)[0], open_model(cfg, torch.float32)[0]
    assert model_fingerprint(whole) == model_fingerprint(streamed)
    assert model_fingerprint(load_model(seed7)[0]) != model_fingerprint(whole)  # same shapes, other weights
    folder = tmp_path / "m"
    _folder_model(folder, 0)
    on_disk = {"name": "tiny_llama", "path": str(folder), "dtype": "float32"}
    before = model_fingerprint(load_model(on_disk)[0])
    assert before == model_fingerprint(open_model(on_disk, torch.float32)[0])
    _folder_model(folder, 1)  # the folder's weights replaced by a model of the very same shapes
    assert model_fingerprint(load_model(on_disk)[0]) != before


def test_a_set_made_for_other_weights_of_the_same_shapes_is_refused(tmp_path):
    """The review's case: the rotation set of one model was fused into another with the same shapes."""
    folder = tmp_path / "model"
    _folder_model(folder, 0)
    args = ("+model=tiny_llama", f"model.path={folder}", "method=quarot", "quant.weight_method=rtn")
    proc = run_stage(tmp_path, "train_rotation.py", *args)
    assert proc.returncode == 0, proc.stderr[-1500:]
    _folder_model(folder, 1)
    one_line_error(run_stage(tmp_path, "fuse.py", *args), "was made for model")
    name, cfg = hand_run(tmp_path, *args)
    assert not paths.fused(cfg, name).exists() and not (tmp_path / "a" / "fused").exists()


def test_codes_outside_the_recorded_bit_width_are_refused(tmp_path):
    """rsq_config.json relabelled W4 -> W3 with its sha256 recomputed in the index (a deliberate edit,
    not an accident): the 4-bit codes do not fit 3 bits, so the loader refuses instead of dequantizing
    them on the wrong grid."""
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    folder = tmp_path / "ckpt"
    save_quantized(folder, model, tok, QUAROT, W4A4, fingerprint)
    config = json.loads((folder / CONFIG).read_text())
    config["quant"]["w_bits"] = 3
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (folder / CONFIG).write_text(text)
    index = json.loads((folder / INDEX).read_text())
    index["metadata"]["rsq_config_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=r"holds codes outside the 3-bit range \[-4, 3\]") as info:
        load_quantized(folder)
    assert "\n" not in str(info.value)


def test_stage_refuses_a_saved_set_that_is_not_a_rotation(tmp_path):
    """A set with valid digests (written by a tool through save_tensors) that is not orthogonal is
    refused by the consumer before any work, and nothing is published."""
    args = ("+model=tiny_llama", "method=quarot")
    proc = run_stage(tmp_path, "train_rotation.py", *args)
    assert proc.returncode == 0, proc.stderr[-1500:]
    name, cfg = hand_run(tmp_path, *args)
    path = paths.rotations(cfg, cfg.sources["global"], "global")
    tensors, meta = load_tensors(path)
    tensors["R2.1"] = tensors["R2.1"] * 1.01
    save_tensors(path, tensors, meta)
    assert run_stage(tmp_path, "calibrate.py", *args).returncode == 0
    one_line_error(run_stage(tmp_path, "fuse.py", *args), "rotation R2.1 is not orthogonal")
    assert not paths.fused(cfg, name).exists()


def test_a_checkpoint_replaced_while_it_is_read_is_said_so(tmp_path):
    """A layer-sequential reader whose folder a fuse replaces (atomically) mid-read: the review saw
    "changed or corrupted after fuse"; the honest line says the checkpoint was replaced."""
    from helpers import RESPIN

    from pipeline.export.checkpoint import open_quantized

    folder = tmp_path / "ckpt"
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(folder, model, tok, QUAROT, W4A4, fingerprint)
    _, reader = open_quantized(folder)
    other, tok2, fingerprint2 = prepared_model("tiny_llama", RESPIN, W4A4, rank=4)
    save_quantized(folder, other, tok2, RESPIN, W4A4, fingerprint2)  # a concurrent fuse publishes
    with pytest.raises(PipelineError, match="was replaced while it was being read .*: load it again"):
        reader.load_layer(0)
    load_quantized(folder)  # loading again reads the new one


def test_seeds_out_of_range_and_huge_literals_are_one_line_before_any_work(tmp_path):
    for override, expected in (("seed=18446744073709551616", "seed=18446744073709551616: must be an integer in "
                                                             "0..9223372036854775807"),
                               ("train.seed=-1", "train.seed=-1: must be an integer in 0..9223372036854775807"),
                               ("seed=" + "7" * 5000, "seed=<5000 digits>: out of range for any setting")):
        one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama", override), expected)
    assert not (tmp_path / "a").exists()


def test_symlink_loops_and_self_links_in_output_paths_are_one_line(tmp_path):
    """paths.artifacts as a symlink loop (an OSError after 18 s of work before), and an output folder
    that is a symlink to itself (a FileExistsError before)."""
    import os

    from pipeline.infra.artifacts import atomic_dir

    loop = tmp_path / "a"
    loop.symlink_to(loop)
    one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama"),
                   f"paths.artifacts={loop}: Too many levels of symbolic links")
    os.unlink(loop)
    (tmp_path / "a").mkdir()
    calib = tmp_path / "a" / "calib"
    calib.symlink_to(calib)
    one_line_error(run_stage(tmp_path, "calibrate.py", "+model=tiny_llama"),
                   f"{calib} exists and is not a folder (a file, or a symlink that leads nowhere or to itself)")
    fused = tmp_path / "fused"
    fused.symlink_to(fused)
    with pytest.raises(PipelineError, match="exists and is not a folder"):
        with atomic_dir(fused / "quarot_w4a4kv4"):
            pass
