"""Hydra config: stage entry points, variant selection, and ``params.yaml`` composition.

Two primary configs live in ``conf/``:
- ``config.yaml``: what a stage run by hand composes. It selects no model, so the user's
  ``python stages/<stage>.py +model=llama3`` composes (hydra-core 1.3 refuses ``+model=`` when the
  defaults list already has a model).
- ``pipeline.yaml``: ``config`` + the default model + the compared variants (method x quant). DVC
  composes it into ``params.yaml`` (``dvc config hydra.enabled true``; ``dvc exp run -S`` recomposes),
  and every DVC stage reads ``params.yaml`` whole (``-cd . -cn params``), so a hand run and a DVC run of
  the same choices see the same config.
"""
from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import PipelineError, check_int
from . import devices, settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
PARAMS_FILE = REPO_ROOT / "params.yaml"
PIPELINE_CONFIG = "pipeline"

# Stages write into the repo (DVC's outs), not into Hydra's per-run output folders.
HYDRA_DEFAULTS = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")


def stage_main(task: Callable[[DictConfig], None]) -> Callable[[], None]:
    """Turn ``task(cfg)`` into a Hydra entry point that reports PipelineError as one line, exit 2."""
    import hydra

    def main() -> None:
        _refuse_huge_integers(sys.argv[1:])
        given = {arg.split("=")[0] for arg in sys.argv[1:]}
        missing = [o for o in HYDRA_DEFAULTS if o.split("=")[0] not in given]
        at = _overrides_position(sys.argv)
        sys.argv[at:at] = missing

        @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
        def _run(cfg: DictConfig) -> None:
            try:
                if cfg.get("model") is None:
                    choices = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
                    raise PipelineError(f"no model selected: add +model=NAME (one of {choices})")
                check_common(cfg)
                resolve_auto_dtype(cfg)
                try:
                    task(cfg)
                except Exception as exc:  # a full disk, a read-only or missing folder: one line
                    reason = _os_failure(exc)
                    if reason is None:
                        raise
                    raise PipelineError(f"{reason}: stopped (outputs are published atomically, so none is "
                                        "half-written)") from None
            except PipelineError as exc:
                logging.getLogger("pipeline").debug("stage failed", exc_info=True)
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)

        _run()

    return main


SEED_MAX = 2**63 - 1
HUGE_DIGITS = 64  # no setting takes an integer this long; Python refuses to parse > 4300 digits (a traceback in Hydra)


def _refuse_huge_integers(args: list[str]) -> None:
    """One line, before Hydra parses anything, for an override whose value is an integer literal of
    ``HUGE_DIGITS`` digits or more (``seed=<5000 digits>`` was a Hydra traceback)."""
    for arg in args:
        key, eq, value = arg.partition("=")
        digits = value.lstrip("+-")
        if eq and digits.isdigit() and len(digits) >= HUGE_DIGITS:
            print(f"error: {key.lstrip('+~')}=<{len(digits)} digits>: out of range for any setting "
                  f"(seeds are 0..{SEED_MAX})", file=sys.stderr)
            sys.exit(2)


_OS_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EACCES, errno.ELOOP)


def _os_failure(exc: Exception) -> str | None:
    """What a full disk or an unwritable folder is, said in a line; None for any other exception.
    safetensors' writer reports an OSError as ``SafetensorError: ... I/O error: <message> (os error N)``."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERRNOS:
        return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error: ", 1)[-1]
    return None


def check_common(cfg: DictConfig) -> None:
    """Refuse, in one line and before any work, settings every stage shares: the seed, window counts
    and lengths, and output folders that are files."""
    for where, node in (("", cfg), ("train.", cfg.get("train")), ("method.", cfg.get("method")),
                        ("model.", cfg.get("model"))):
        if node is not None and "seed" in node:  # torch and numpy seeds: 0..2**63-1 on every platform
            check_int(node.seed, f"{where}seed", 0, high=SEED_MAX)
    for node, key, low, none_ok in (("calib", "seqlen", 2, False), ("calib", "n_windows", 1, False),
                                    ("eval", "seqlen", 2, False), ("eval", "max_windows", 1, True),
                                    ("rank_sweep", "max_windows", 1, True)):
        section = cfg.get(node)
        if section is not None and key in section:
            check_int(section[key], f"{node}.{key}", low, none_ok)
    for key in (cfg.paths.keys() if cfg.get("paths") is not None else ()):
        path = Path(str(cfg.paths[key])).expanduser()
        try:
            path.stat()
        except FileNotFoundError:
            continue  # made when the stage writes
        except OSError as exc:  # a symlink loop on the path, a file where a folder should be
            raise PipelineError(f"paths.{key}={path}: {exc.strerror} (a symlink loop or a file on its path)") from None
        if not path.is_dir():
            raise PipelineError(f"paths.{key}={path} is a file, not a folder")


def resolve_auto_dtype(cfg: DictConfig) -> None:
    """``model.dtype=auto`` -> the concrete dtype for the run's ``device`` (``devices.auto_dtype``), in
    place, so the stage, its artifacts and MLflow's params all name the dtype that was used."""
    if str(cfg.model.get("dtype")) == "auto":
        dtype = devices.resolve_dtype("auto", device=devices.resolve_device(cfg.get("device")))
        with open_dict(cfg):
            cfg.model.dtype = devices.dtype_name(dtype)
        logging.getLogger("pipeline").info("model.dtype=auto: %s on this host", cfg.model.dtype)


_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _overrides_position(argv: list[str]) -> int:
    """Index of the first override in ``argv`` (else its end): Hydra's argparse needs all overrides
    in one run, so extra overrides go right before the user's (``x.py +model=m --cfg job`` and
    ``x.py -cd . -cn params variant=v`` both stay valid)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            return i
        i += 2 if arg in _FLAGS_WITH_VALUE and "=" not in arg else 1
    return len(argv)


def select_variant(cfg: DictConfig) -> tuple[str, DictConfig]:
    """The run's output name, and its config with the chosen variant's ``method``/``quant``/``approx``
    and ``sources``: the names whose ``global``/``layerwise`` rotation sets the run reads and writes.

    With ``variant=NAME`` (DVC stages), ``variants.NAME.{method,quant,approx}`` replace the top-level
    ones; ``variants.NAME.global_from``/``layerwise_from`` reuse another variant's trained set (same
    rotation method and quant, checked). Without it (hand runs), every name ends in a tag of the whole
    setting it depends on (``settings``), so hand runs that differ in any setting never share a path:
    rotation sets ``<method>-<tag>``, subspaces ``<method>_r<rank>-<tag>`` and outputs
    ``<method>_<quant>[_gptq][_r<rank>]-<tag>``, ``<quant>`` the label of the quant fields
    (``settings.quant_label``).
    """
    name = cfg.get("variant")
    out = cfg.copy()
    if not name:
        base = f"{cfg.method.name}_{settings.quant_label(cfg.quant)}"
        stage = "layerwise" if cfg.method.get("per_layer") else "global"
        # a rotation set and a subspace are named by the method alone: the quant fields they depend on
        # (training's activation quantizer) are in their tags, the weight quantizer is not
        rotations = f"{cfg.method.name}-{settings.setting_tag(settings.rotation_setting(cfg, stage))}"
        name = base + ("_gptq" if cfg.quant.get("weight_method") == "gptq" else "")
        subspace = rotations
        if cfg.method.get("transition") == "low_rank":
            rank = f"_r{cfg.approx.rank}" + (f"{cfg.approx.energy:g}" if cfg.approx.rank == "adaptive" else "")
            name += rank
            # the subspace depends on the rotations and the approximation, not on the weight quantizer
            subspace = f"{cfg.method.name}{rank}-{settings.setting_tag(settings.subspace_setting(cfg))}"
        name += f"-{settings.setting_tag(settings.output_setting(cfg))}"
        with open_dict(out):
            out.sources = {"global": rotations, "layerwise": rotations, "subspace": subspace}
        return name, out
    variants = cfg.get("variants") or {}
    if name not in variants:
        known = ", ".join(variants) or "none configured"
        raise PipelineError(f"variant={name} is not in variants ({known})")
    chosen = variants[name]
    sources = {}
    for stage in ("global", "layerwise"):
        source = chosen.get(f"{stage}_from") or name
        if source != name:
            _check_source(variants, name, source, stage, bool(cfg.get("train", {}).get("quantize_weights")))
        sources[stage] = source
    sources["subspace"] = name
    with open_dict(out):
        out.method = chosen.method
        out.quant = chosen.quant
        if chosen.get("approx") is not None:
            out.approx = chosen.approx
        out.sources = sources
    return str(name), out


def _check_source(variants: DictConfig, name: str, source: str, stage: str, weights_in_training: bool) -> None:
    """A variant may reuse ``source``'s rotation set only if that set was made the same way: same
    rotation method, same activation/KV quant (and weight quant when training quantizes weights)."""
    where = f"variants.{name}.{stage}_from={source}"
    if source not in variants:
        raise PipelineError(f"{where}: no such variant")
    mine, theirs = variants[name], variants[source]
    if stage == "layerwise" and not theirs.method.get("per_layer"):
        raise PipelineError(f"{where}: {source} has no per-layer rotations")
    differ = [f for f in settings.ROTATION_FIELDS if mine.method.get(f) != theirs.method.get(f)]
    trained_with = ["a_bits", "kv_bits", "a_clip_ratio", "kv_clip_ratio"]
    if weights_in_training:  # training fake-quantizes weights with RTN on this grid
        trained_with += ["w_bits", "w_mse_clip", "w_group_size"]
    differ += [f"quant.{f}" for f in trained_with if mine.quant.get(f) != theirs.quant.get(f)]
    if differ:
        raise PipelineError(f"{where}: its rotations were made differently ({', '.join(differ)} differ)")


def compose_pipeline(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/pipeline.yaml`` (what DVC writes into params.yaml)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=PIPELINE_CONFIG, overrides=overrides or [])


def write_params(path: Path = PARAMS_FILE, overrides: list[str] | None = None) -> None:
    """Write the composed pipeline config to ``params.yaml`` (what ``dvc exp run`` does with hydra on)."""
    data = OmegaConf.to_container(compose_pipeline(overrides), resolve=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


if __name__ == "__main__":  # python -m pipeline.infra.config [overrides...]: regenerate params.yaml
    write_params(overrides=sys.argv[1:])
    print(f"wrote {PARAMS_FILE}")
