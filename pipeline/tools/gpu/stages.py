"""The ``stages`` part of ``gpu_check``: every stage on the device under test against the CPU.

A tiny random-init Llama (``tiny_llama``'s sizes, float32, the byte tokenizer) and the calibration /
eval text of the data dir (``RSQ_DATA_DIR``; the GPU machine gets a slice in ``.gpu_carry/data``).
Each stage runs twice, on the CPU and on the device, **from the same inputs** (the CPU run's artifacts
of the stage before), so a difference belongs to that stage alone; the method is ReSpinQuant (the
paper's variant: every stage applies), W4A4KV4 with the paper's clip ratios.

Each comparison is a ``checks`` row with its bound in words and pass/fail. Bounds are float32 rounding
scaled by what each stage does: a quantized artifact may flip a code where a value sits on a rounding
boundary, so codes are compared by the share that differ (and by at most one grid step).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ...eval.act_stats import activation_stats_streamed
from ...export.checkpoint import INDEX, load_quantized, open_quantized
from ...eval.data import calibration_text, eval_windows, sample_windows, tokenize, wikitext2_test_text
from ...methods import MethodSpec, make_rotations, per_layer_bases, prepare_base
from ...model.load import load_model, model_fingerprint
from ...eval.perplexity import perplexity, perplexity_streamed
from ...quant.quantizers import QuantSpec
from ...fuse.streamed import fuse_streamed
from ...model.streaming import SourceLayers, open_model
from ...rotation.subspace import ApproxSpec, approximate_rotations
from ...train.loop import TrainSpec, TrainState, train_rotations
from ..train_profile import SHAPES
from ...train.trainable import TrainableRotations, enable_checkpointing, parametrize_rotations
from ...quant.codes import unpack

TOKEN_IDS = {"rms_norm_eps": 1e-5, "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
# the device check: tiny_llama's sizes (non-power-of-two Hadamards, GQA, tied embeddings)
TINY_MODEL = {"name": "gpu_check_tiny", "source": "random_init", "seed": 0, "dtype": "float32",
              "config": {**SHAPES["tiny_llama"], **TOKEN_IDS}}
# --tiny (the test suite's run on a CPU): smaller still, the same code paths
MICRO_SHAPE = dict(model_type="llama", vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                   tie_word_embeddings=True)
MICRO_MODEL = {"name": "gpu_check_micro", "source": "random_init", "seed": 0, "dtype": "float32",
               "config": {**MICRO_SHAPE, **TOKEN_IDS}}
METHOD = MethodSpec(name="respinquant", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True,
                    per_layer=True, train=True, seed=0, transition="low_rank", chained=False)
QUANT = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, a_clip_ratio=0.9, kv_clip_ratio=0.95)
DATA = {"calib_source": "enwiki"}
TRAIN = TrainSpec(steps=2, lr=1.5, batch_size=2, checkpoint_every=0, seed=0)
APPROX = ApproxSpec(rank=32)

# Bounds (module doc). 4-bit fake quantization turns rounding-level differences into flipped codes, so
# the bounds of the trained and GPTQ artifacts are set from their measured sensitivity: on the CPU, a
# 1e-7 perturbation of the start rotations moved 2 Cayley steps' rotations by up to 8e-4 (losses 7e-4
# relative), changed 1 RTN code in 565k but 9.7% of the GPTQ codes (up to 3 steps: GPTQ's error
# feedback carries one flip along the row), and the perplexity by 6.5e-4 (RTN) and 4.2e-3 (GPTQ).
REL_STATS = 1e-4       # activation statistics: float32 forward of the same weights, relative to the largest
ABS_ROTATION = 2e-3    # trained rotations after 2 Cayley steps (entries ~ 1/sqrt(192)); sensitivity 8e-4
REL_LOSS = 2e-3        # training losses; sensitivity 7e-4
ABS_SUBSPACE = 1e-6    # T^ - I = Q M Q^T, float64 eigh/polar of the same input
CODE_SHARE = {"rtn": 1e-3, "gptq": 0.2}  # share of weight codes allowed to differ; sensitivity 2e-6 / 0.097
CODE_STEP = {"rtn": 1, "gptq": 4}         # and by how many grid steps; sensitivity 1 / 3
REL_FLOAT = 1e-4       # float tensors of the checkpoint (scales, norms, embeddings, transitions)
REL_PPL_SAME = 2e-3    # one checkpoint evaluated on two devices
REL_PPL_MADE = 1e-2    # checkpoints made on two devices, evaluated on the CPU; sensitivity 4.2e-3 (GPTQ)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, max |a - b| / max |b|)`` in float64 on the CPU."""
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    if a64.shape != b64.shape:
        return float("inf"), float("inf")
    if a64.numel() == 0:
        return 0.0, 0.0
    abs_diff = (a64 - b64).abs().max().item()
    return abs_diff, abs_diff / max(b64.abs().max().item(), 1e-30)


def compare_sets(report, name: str, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], bound: float,
                 relative: bool = False) -> None:
    """One check row over every tensor of two same-keyed sets: the worst key's abs (or rel) diff."""
    if not ref:
        report.check("stages", name, False, "a non-empty set", error="nothing to compare")
        return
    worst, worst_key, worst_abs, worst_rel = -1.0, None, 0.0, 0.0
    for key in sorted(ref):
        if key not in got:
            report.check("stages", name, False, f"same keys; max {'rel' if relative else 'abs'} diff <= {bound:g}",
                         missing=key)
            return
        a, r = max_diff(got[key], ref[key])
        value = r if relative else a
        if value > worst:
            worst, worst_key, worst_abs, worst_rel = value, key, a, r
    report.check("stages", name, worst <= bound, f"max {'rel' if relative else 'abs'} diff <= {bound:g}",
                 max_abs=worst_abs, max_rel=worst_rel, worst=worst_key, tensors=len(ref))


def calibrate(cfg: dict, device: torch.device, windows: torch.Tensor) -> list[dict]:
    """The calibrate stage's activation statistics, layer-sequential on ``device``."""
    model, _, source = open_model(cfg, torch.float32)
    layers = SourceLayers(model, source, device)
    layers.load_head()
    return activation_stats_streamed(model, layers, windows)


def train(cfg: dict, device: torch.device, stage: str, windows: torch.Tensor, init: dict[str, torch.Tensor],
          spec: TrainSpec = TRAIN) -> tuple[dict, list]:
    """``train.steps`` Cayley steps of the rotation set ``init`` on ``device`` (rotate_global's or
    rotate_layerwise's in-memory path): the exported set and the losses."""
    model = load_model(cfg)[0]
    train_quant = replace(QUANT, w_bits=16)  # train.quantize_weights=false, as in every train profile
    adapter = prepare_base(model, METHOD, train_quant)
    model.to(device)
    enable_checkpointing(model)
    rotations = TrainableRotations(init).to(device)
    parametrize_rotations(model, adapter, rotations, train_quant)
    state = train_rotations(model, rotations, windows.to(device), spec, TrainState(), lambda s: None,
                            desc=f"rotate_{stage} ({device.type})")
    return rotations.export(), state.losses


def approximate(cfg: dict, device: torch.device, layerwise: dict[str, torch.Tensor]) -> tuple[dict, list[dict]]:
    n_layers = cfg["config"]["num_hidden_layers"]
    with device:
        return approximate_rotations(layerwise, n_layers, APPROX, progress=False, device=device, chained=False)


def fuse(cfg: dict, device: torch.device, folder: Path, quant: QuantSpec, rotations: dict, subspace: dict,
         calib: torch.Tensor) -> Path:
    model, tok, source = open_model(cfg, torch.float32)
    fuse_streamed(folder, model, tok, source, METHOD, rotations, quant, model_fingerprint(model), subspace,
                  calib, None, device, {"model_name": cfg["name"], "variant": "gpu_check"})
    return folder


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a fused checkpoint's shards (the round trip's ground truth: what is on disk)."""
    import json

    from safetensors.torch import load_file

    files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def compare_checkpoints(report, name: str, got: Path, ref: Path, weights: str) -> None:
    """Codes (unpacked int4) by the share that differ and the largest step; float tensors relatively."""
    a, b = checkpoint_tensors(got), checkpoint_tensors(ref)
    if sorted(a) != sorted(b):
        report.check("stages", name, False, "same tensor names", only_got=sorted(set(a) - set(b))[:5],
                     only_ref=sorted(set(b) - set(a))[:5])
        return
    differ = total = worst_step = 0
    floats_a, floats_b = {}, {}
    for key in b:
        if b[key].dtype == torch.uint8:
            ca, cb = unpack(a[key], 4).to(torch.int16), unpack(b[key], 4).to(torch.int16)
            differ += int((ca != cb).sum())
            total += cb.numel()
            worst_step = max(worst_step, int((ca - cb).abs().max()) if cb.numel() else 0)
        elif b[key].is_floating_point():
            floats_a[key], floats_b[key] = a[key], b[key]
        else:
            differ += int((a[key] != b[key]).sum())
            total += b[key].numel()
    share = differ / max(total, 1)
    bound, steps = CODE_SHARE[weights], CODE_STEP[weights]
    report.check("stages", f"{name}_codes", share <= bound and worst_step <= steps,
                 f"share of int codes that differ <= {bound:g}, each by at most {steps} step(s)",
                 codes=total, differ=differ, share=share, max_step=worst_step)
    compare_sets(report, f"{name}_floats", floats_a, floats_b, REL_FLOAT, relative=True)


def run(ctx) -> None:
    """The ``stages`` part (module doc)."""
    cpu, dev, report = torch.device("cpu"), ctx.device, ctx.report
    cfg = MICRO_MODEL if ctx.tiny else TINY_MODEL
    seqlen, n_calib = (32, 2) if ctx.tiny else (128, 4)  # the CPU half dominates: keep it short
    # --tiny: no MSE clip search (the slowest part of a CPU fuse; the same code otherwise)
    quant = replace(QUANT, w_mse_clip=False) if ctx.tiny else QUANT
    spec = replace(TRAIN, batch_size=1) if ctx.tiny else TRAIN
    tok = open_model(cfg, torch.float32)[1]
    calib = sample_windows(tokenize(calibration_text(DATA)[:400_000], tok), n_calib, seqlen, seed=0)
    evalw = eval_windows(tokenize(wikitext2_test_text(DATA)[:200_000], tok), seqlen, max_windows=2 if ctx.tiny else 4)

    # calibrate: statistics of the first 2 windows
    ref_rows, got_rows = calibrate(cfg, cpu, calib[:2]), calibrate(cfg, dev, calib[:2])
    keys = [k for k, v in ref_rows[0].items() if isinstance(v, float)]
    compare_sets(report, "calibrate_act_stats", {f"{i}.{k}": torch.tensor(r[k]) for i, r in enumerate(got_rows) for k in keys},
                 {f"{i}.{k}": torch.tensor(r[k]) for i, r in enumerate(ref_rows) for k in keys}, REL_STATS, relative=True)

    # rotate_global, then rotate_layerwise from the CPU's global set
    model = open_model(cfg, torch.float32)[0]
    init = make_rotations(replace(METHOD, per_layer=False, transition="dense"), model)
    ref_global, ref_loss = train(cfg, cpu, "global", calib, init, spec)
    got_global, got_loss = train(cfg, dev, "global", calib, init, spec)
    compare_sets(report, "rotate_global_rotations", got_global, ref_global, ABS_ROTATION)
    compare_sets(report, "rotate_global_losses", {"loss": torch.tensor(got_loss)}, {"loss": torch.tensor(ref_loss)},
                 REL_LOSS, relative=True)
    n_layers = cfg["config"]["num_hidden_layers"]
    init = {k: v for k, v in ref_global.items() if k.startswith("R2.")}
    init.update(per_layer_bases(ref_global["R1"], n_layers))
    ref_layer, ref_loss = train(cfg, cpu, "layerwise", calib, init, spec)
    got_layer, got_loss = train(cfg, dev, "layerwise", calib, init, spec)
    compare_sets(report, "rotate_layerwise_rotations", got_layer, ref_layer, ABS_ROTATION)
    compare_sets(report, "rotate_layerwise_losses", {"loss": torch.tensor(got_loss)}, {"loss": torch.tensor(ref_loss)},
                 REL_LOSS, relative=True)

    # approximate: compare T^ - I = Q M Q^T (Q's column signs are free); an empty set fails
    ref_sub, ref_rows = approximate(cfg, cpu, ref_layer)
    got_sub, _ = approximate(cfg, dev, ref_layer)

    def projected(sub: dict) -> dict[str, torch.Tensor]:
        out = {}
        for key in (k for k in sub if k.startswith("Q.")):
            Q, M = sub[key].cpu().double(), sub["M." + key[2:]].cpu().double()
            out[key[2:]] = Q @ M @ Q.T
        return out

    compare_sets(report, "approximate_subspace", projected(got_sub), projected(ref_sub), ABS_SUBSPACE)
    report.data["checks"][-1]["min_sigma_gap"] = min((r["sigma_gap"] for r in ref_rows), default=None)
    ref_sub = {k: v.cpu().float() for k, v in ref_sub.items()}

    # fuse (RTN and GPTQ), the checkpoint round trip and perplexity
    for weights in ("rtn", "gptq"):
        wq = replace(quant, weight_method=weights)
        ref_dir = fuse(cfg, cpu, ctx.work / f"fused-{weights}-cpu", wq, ref_layer, ref_sub, calib)
        got_dir = fuse(cfg, dev, ctx.work / f"fused-{weights}-{dev.type}", wq, ref_layer, ref_sub, calib)
        compare_checkpoints(report, f"fuse_{weights}", got_dir, ref_dir, weights)
        round_trip(report, f"checkpoint_{weights}", ref_dir, dev)
        ppl_ref = perplexity(load_quantized(ref_dir, device=cpu), evalw, desc="ppl cpu")["ppl"]
        ppl_dev = perplexity(load_quantized(ref_dir, device=dev), evalw.to(dev), desc=f"ppl {dev.type}")["ppl"]
        ppl_made = perplexity(load_quantized(got_dir, device=cpu), evalw, desc="ppl cpu")["ppl"]

        model_s, reader = open_quantized(ref_dir, dev)
        ppl_stream = perplexity_streamed(model_s, reader, evalw, desc=f"ppl {dev.type}")["ppl"]
        for name, value, ref, bound in (("perplexity", ppl_dev, ppl_ref, REL_PPL_SAME),
                                        ("perplexity_layer_sequential", ppl_stream, ppl_ref, REL_PPL_SAME),
                                        ("perplexity_of_device_checkpoint", ppl_made, ppl_ref, REL_PPL_MADE)):
            rel = abs(value - ref) / ref
            report.check("stages", f"{name}_{weights}", rel <= bound, f"rel diff <= {bound:g}",
                         value=value, cpu=ref, max_rel=rel)


def round_trip(report, name: str, folder: Path, device: torch.device) -> None:
    """The checkpoint loaded on ``device``: its packed codes, scales and online ops equal what the file
    holds bit for bit (loading moves, it does not compute)."""
    model = load_quantized(folder, device=device)
    on_disk = checkpoint_tensors(folder)
    loaded = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    common = sorted(set(on_disk) & set(loaded))
    unequal = [k for k in common if on_disk[k].dtype == loaded[k].dtype and not torch.equal(on_disk[k], loaded[k])]
    report.check("stages", name, bool(common) and not unequal, "bit-exact (every tensor the file and the loaded model share)",
                 compared=len(common), unequal=unequal[:5])
