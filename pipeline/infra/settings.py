"""What made an artifact: the resolved settings a stage's output depends on.

Each producing stage records its output's setting (``record``) and each consumer compares the setting
recorded in what it reads with the one its own config implies (``check_setting``: one line naming both
where they differ). Hand runs (no ``variant=``) also hash the setting into their output names
(``setting_tag``), so two hand runs that differ in any setting never share a path.

The settings, from the narrowest to the widest:
- ``calib_setting(cfg)``: the calibration windows (their file name carries its tag: ``paths.calib_windows``).
- ``rotation_setting(cfg, stage)``: a rotation set (``global`` or ``layerwise``): the model, the seed,
  the rotation fields of the method, and, when the method is trained, the training profile, the
  calibration sample and the activation/KV quantizers training saw (and the weight quantizer when
  training fake-quantizes weights).
- ``subspace_setting(cfg)``: the layer-wise set's setting and the approximation (rank, energy, chained).
- ``output_setting(cfg)``: what a fused checkpoint and its evaluation are made of: the rotation
  setting of the set it fuses, the whole method and the whole quant spec, and the approximation of a
  low-rank method.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .artifacts import load_tensors
from .errors import PipelineError

SETTING_KEY = "setting"  # the artifact metadata / checkpoint config key that holds the recorded setting
# method fields that decide a rotation set (the rest say how it is fused); a variant may reuse another's
# set when these agree (config.select_variant's source check)
ROTATION_FIELDS = ("r1", "r2", "seed", "train", "online_r3", "online_r4")
# settings that change where or how fast a stage runs, not what it computes
NOT_RESULT = {"model": ("cache_dir",),
              "train": ("device", "stream", "fsdp", "grad_checkpointing", "checkpoint_every")}
_TRAINED_WITH = ("a_bits", "kv_bits", "a_clip_ratio", "kv_clip_ratio")
_TRAINED_WITH_WEIGHTS = ("w_bits", "w_mse_clip", "w_group_size")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _without(section: str, values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in NOT_RESULT.get(section, ())}


def calib_setting(cfg: DictConfig) -> dict:
    """The setting of the calibration windows: the model, the text, the sample's size and seed."""
    return {"model": _without("model", _plain(cfg.model)), "data": cfg.data.get("name"),
            "n_windows": cfg.calib.n_windows, "seqlen": cfg.calib.seqlen, "seed": cfg.get("seed", 0)}


def rotation_setting(cfg: DictConfig, stage: str = "global") -> dict:
    """The setting a rotation set of ``stage`` (``global`` | ``layerwise``) is made under (module doc)."""
    method = _plain(cfg.method)
    fields = ROTATION_FIELDS + (("per_layer",) if stage == "layerwise" else ())
    setting: dict[str, Any] = {"model": _without("model", _plain(cfg.model)), "seed": cfg.get("seed", 0),
                               "stage": stage, "method": {f: method.get(f) for f in fields}}
    if method.get("train"):
        quant = _plain(cfg.quant)
        trained_with = _TRAINED_WITH + (_TRAINED_WITH_WEIGHTS if cfg.train.get("quantize_weights") else ())
        setting["train"] = _without("train", _plain(cfg.train))
        setting["calib"] = calib_setting(cfg)
        setting["train_quant"] = {f: quant.get(f) for f in trained_with}
    return setting


def subspace_setting(cfg: DictConfig) -> dict:
    """The setting of an approximate stage's subspace: its layer-wise set's, plus the approximation."""
    return {**rotation_setting(cfg, "layerwise"), "approx": _approx(cfg)}


def output_setting(cfg: DictConfig) -> dict:
    """The setting of a fused checkpoint and of its evaluation (module doc)."""
    method = _plain(cfg.method)
    stage = "layerwise" if method.get("per_layer") else "global"
    setting = {**rotation_setting(cfg, stage), "method": method, "quant": _plain(cfg.quant)}
    if method.get("transition") == "low_rank":
        setting["approx"] = _approx(cfg)
    return setting


def _approx(cfg: DictConfig) -> dict:
    return {"rank": cfg.approx.rank, "energy": cfg.approx.energy, "chained": bool(cfg.method.get("chained"))}


def quant_label(quant: DictConfig | dict) -> str:
    """The quant setting's name from its fields: ``w4a4kv4``, ``w16a16``, ``w4a16`` (K/V cache 16-bit
    left out), ``w4g128a4kv4`` (weight groups of 128): what results are labelled with, so a hand override
    of a bit-width or group size shows in the label (the presets' names are these labels)."""
    quant = _plain(quant)
    group = quant.get("w_group_size") or 0
    kv = quant.get("kv_bits", 16)
    return (f"w{quant.get('w_bits', 16)}" + (f"g{group}" if group else "") + f"a{quant.get('a_bits', 16)}"
            + (f"kv{kv}" if kv != 16 else ""))


def setting_tag(setting: dict) -> str:
    """8 hex digits of the setting's sha256: the part of a hand run's output name that tells settings apart."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:8]


def record(setting: dict) -> str:
    """The setting as artifact metadata (a JSON string)."""
    return json.dumps(setting, sort_keys=True, default=str)


def flat(setting: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested setting."""
    out: dict[str, Any] = {}
    for key, value in setting.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(recorded: dict, expected: dict) -> list[str]:
    """``key=recorded (this run: expected)`` for every key where the two settings differ, sorted."""
    mine, theirs = flat(recorded), flat(expected)
    return [f"{k}={mine.get(k, '<none>')!s} (this run: {theirs.get(k, '<none>')!s})"
            for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def check_setting(path: str | Path, recorded: str | dict | None, expected: dict, remedy: str) -> None:
    """Refuse, in one line naming ``path`` and both values, an input whose recorded setting is not
    ``expected`` (the one this run's config implies); ``remedy`` says which stage makes a fitting one."""
    if recorded is None:
        raise PipelineError(f"{path} records no setting (made by an older version): {remedy}")
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError:
            raise PipelineError(f"{path}: its recorded setting is not JSON: {remedy}") from None
    diff = differences(recorded, expected)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise PipelineError(f"{path} was made under another setting: {shown}: {remedy}")



def load_checked(path: Path, fingerprint: str, expected: dict, remedy: str) -> tuple[dict, dict[str, str]]:
    """``load_tensors`` of an artifact made for this model, refused unless its recorded setting is ``expected``."""
    tensors, meta = load_tensors(path, fingerprint)
    check_setting(path, meta.get(SETTING_KEY), expected, remedy)
    return tensors, meta


def calib_windows(path: Path, cfg: DictConfig, fingerprint: str):
    """The calibration windows ``(n_windows, seqlen)`` at ``path`` (``paths.calib_windows``), made under
    this run's calibration setting."""
    return load_checked(path, fingerprint, calib_setting(cfg), "rerun calibrate with this run's settings")[0]["windows"]
