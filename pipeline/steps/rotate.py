"""rotate_global and rotate_layerwise (one script: stages/train_rotation.py, ``rotation_stage=``).

- rotate_global: the method's global rotation set R1 + R2 per layer. Untrained methods (QuaRot) write
  their seeded Hadamards; trained ones (SpinQuant, and the first stage of per-layer methods) train them.
- rotate_layerwise: per-layer methods only: bases A_i, B_i all start from the global R1 (every
  transition starts at I) and R2 from the global result, then train with exact dense transitions.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
from dataclasses import asdict, replace

import torch
from omegaconf import DictConfig, OmegaConf

from ..train import distributed as ddp
from ..infra import paths
from ..infra.artifacts import load_tensors, save_tensors, tensor_digest, write_csv
from ..infra.config import select_variant
from ..infra.devices import choose_stream, model_dtype, resolve_device
from ..infra.errors import PipelineError
from ..infra.settings import SETTING_KEY, calib_windows, check_setting, record, rotation_setting
from ..methods import MethodSpec, check_rotations, make_rotations, per_layer_bases, prepare_base, quant_spec
from ..model.load import cache_dir, load_model, model_fingerprint
from ..train.streamed import stream_for_training
from ..model.streaming import open_model
from ..infra.tracking import stage_run
from ..train.loop import TrainSpec, TrainState, train_rotations
from ..train.trainable import TrainableRotations, enable_checkpointing, parametrize_rotations

STAGES = ("global", "layerwise")
STREAM_SHARE = 0.5  # train.stream=auto streams a model whose weights exceed this share of free memory


def train_spec(cfg: DictConfig) -> TrainSpec:
    fields = TrainSpec.__dataclass_fields__
    return TrainSpec(**{k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k in fields})


def _load_checkpoint(path, fingerprint: str, signature: str, rotations: TrainableRotations) -> TrainState:
    """Resume state if a checkpoint of this very run exists (same model and settings) and passes its
    digest check, else fresh (with a warning for a damaged one)."""
    if not path.is_file():
        return TrainState()
    try:
        tensors, meta = load_tensors(path, fingerprint)
    except PipelineError as exc:  # a checkpoint is a cache: a damaged one costs the steps, never the result
        print(f"warning: not resuming from the checkpoint: {exc}; training starts over", file=sys.stderr, flush=True)
        return TrainState()
    if meta.get("signature") != signature:
        return TrainState()
    with torch.no_grad():
        for name, p in rotations.as_dict().items():
            p.copy_(tensors[f"rot/{name}"].to(p.device, p.dtype))
    momentum = {k[len("mom/"):]: v for k, v in tensors.items() if k.startswith("mom/")}
    print(f"resuming from {path} at step {meta['step']}")
    return TrainState(step=int(meta["step"]), losses=json.loads(meta["losses"]), momentum=momentum,
                      step_seconds=json.loads(meta["step_seconds"]))


def _train(cfg: DictConfig, model, rotations: TrainableRotations, spec: TrainSpec, train_quant, method: MethodSpec,
           init: dict[str, torch.Tensor], fingerprint: str, name: str, stage: str, device: torch.device) -> TrainState:
    """Train ``rotations`` (parametrizing ``model``) on the calibration windows, resuming a checkpoint
    of this very run, checkpointing as it goes."""
    windows = calib_windows(paths.calib_windows(cfg), cfg, fingerprint).to(device)
    # a checkpoint resumes only the very same run: same settings, ranks, calibration tokens and start
    signature = json.dumps({"train": asdict(spec), "quant": asdict(train_quant), "method": asdict(method),
                            "windows": tensor_digest(windows), "init": tensor_digest(*init.values()),
                            "world": ddp.world_size()}, sort_keys=True)
    ckpt = paths.train_checkpoint(cfg, name, stage)
    state = _load_checkpoint(ckpt, fingerprint, signature, rotations)

    def save_checkpoint(s: TrainState) -> None:
        if not ddp.is_main():
            return
        tensors = {f"rot/{k}": v.detach().cpu() for k, v in rotations.as_dict().items()}
        tensors.update({f"mom/{k}": v for k, v in s.momentum.items()})
        save_tensors(ckpt, tensors, {"fingerprint": fingerprint, "signature": signature, "step": str(s.step),
                                     "losses": json.dumps(s.losses), "step_seconds": json.dumps(s.step_seconds)})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = train_rotations(model, rotations, windows, spec, state, save_checkpoint, desc=f"rotate_{stage} {name}")
    return state


def run(cfg: DictConfig) -> None:
    import mlflow

    stage = cfg.get("rotation_stage", "global")
    if stage not in STAGES:
        raise PipelineError(f"rotation_stage={stage}: choose one of {', '.join(STAGES)}")
    name, cfg = select_variant(cfg)
    method = MethodSpec.from_cfg(cfg.method)
    if stage == "layerwise" and not method.per_layer:
        raise PipelineError(f"method {method.name} has no per-layer bases: rotate_layerwise does not apply")
    spec = train_spec(cfg) if method.train else None  # bad settings refused before any loading
    # where training runs (train.device, by default the top-level device), checked before any loading
    device = resolve_device(cfg.train.device, "train.device")
    if device.type == "cuda" and ddp.world_size_from_env() > 1:  # torchrun: one GPU per local rank
        device = resolve_device(f"cuda:{ddp.local_rank()}", "train.device")
    dtype = model_dtype(cfg.model.get("dtype"), device)
    fsdp = bool(cfg.train.get("fsdp", False)) and method.train
    if fsdp and ddp.world_size_from_env() < 2:
        raise PipelineError("train.fsdp=true shards the model over torchrun's ranks: launch the stage with "
                            "`torchrun --nproc_per_node=N` (N >= 2), or set train.fsdp=false")
    # the skeleton (no weights read) gives the sizes; training loads every weight, or streams the
    # decoder layers when the model does not fit (train.stream)
    model, _, source = open_model(cfg.model, dtype)
    fingerprint = model_fingerprint(model)
    stream = method.train and choose_stream(cfg.train.get("stream", "auto"), "train.stream", lambda: source.nbytes(dtype),
                                            device, STREAM_SHARE)
    if stream and fsdp:
        raise PipelineError("train.stream and train.fsdp do not combine (each rank would stream the whole model): "
                            "set train.stream=false with train.fsdp=true")
    if method.train and not stream:
        model = load_model(cfg.model)[0]
    global_method = replace(method, per_layer=False, transition="dense")
    if stage == "global":
        init = make_rotations(global_method, model)
    else:
        global_path = paths.rotations(cfg, cfg.sources["global"], "global")
        global_set, global_meta = load_tensors(global_path, fingerprint)
        check_setting(global_path, global_meta.get(SETTING_KEY), rotation_setting(cfg, "global"),
                      f"rerun rotate_global of {cfg.sources['global']} with this run's settings")
        check_rotations(global_set, global_method, model)
        init = {k: v for k, v in global_set.items() if k.startswith("R2.")}
        init.update(per_layer_bases(global_set["R1"], model.config.num_hidden_layers))
    name = cfg.sources[stage]  # the rotation set's name (a variant may reuse another's global set)
    out = paths.rotations(cfg, name, stage)
    meta = {"fingerprint": fingerprint, "model": cfg.model.name, "method": method.name, "stage": stage,
            "method_config": json.dumps(OmegaConf.to_container(cfg.method, resolve=True)),
            SETTING_KEY: record(rotation_setting(cfg, stage))}

    if not method.train:
        if not ddp.is_main():
            return
        with stage_run(cfg, f"rotate_{stage}", name):
            save_tensors(out, init, meta)
            mlflow.log_metrics({"n_rotations": len(init), "train_steps": 0})
            mlflow.log_artifact(str(out))
        return

    ddp.init_from_env(device)
    train_quant = quant_spec(cfg.quant) if cfg.train.quantize_weights else replace(quant_spec(cfg.quant), w_bits=16)
    rotations = TrainableRotations(init).to(device)
    param_bytes = None
    with contextlib.ExitStack() as stack:
        if stream:  # the decoder layers are read from a spill folder of prepared layers at each use
            spill = cache_dir(cfg.model) / "spill"
            stack.enter_context(stream_for_training(model, source, method, train_quant, rotations, device, spill))
        else:
            adapter = prepare_base(model, method, train_quant)
            model.to(device)
            if cfg.train.grad_checkpointing:
                enable_checkpointing(model)
            parametrize_rotations(model, adapter, rotations, train_quant)
            if fsdp:
                param_bytes = ddp.shard_layers(model, adapter.layers(model), device)
        state = _train(cfg, model, rotations, spec, train_quant, method, init, fingerprint, name, stage, device)
    if not ddp.is_main():
        return
    trained = rotations.export()
    with stage_run(cfg, f"rotate_{stage}", name):
        save_tensors(out, trained, {**meta, "train_steps": str(state.step)})
        curve = paths.loss_curve(cfg, name, stage)
        write_csv(curve, [{"step": i + 1, "loss": loss} for i, loss in enumerate(state.losses)])
        for i, loss in enumerate(state.losses):
            mlflow.log_metric("train_loss", loss, step=i + 1)
        timed = state.step_seconds[1:] or state.step_seconds  # the first step pays warm-up
        metrics = {
            "train_steps": state.step, "train_loss_first": state.losses[0] if state.losses else float("nan"),
            "train_loss_last": state.losses[-1] if state.losses else float("nan"),
            "train_step_seconds": sum(timed) / max(len(timed), 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "orthogonality_error_fp32": rotations.max_orthogonality_error(),
            "train_streamed": int(stream),
        }
        if param_bytes is not None:
            metrics["fsdp_param_mib_per_rank"] = param_bytes / 2**20
        if device.type == "cuda":
            metrics["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(curve))
    paths.train_checkpoint(cfg, name, stage).unlink(missing_ok=True)
