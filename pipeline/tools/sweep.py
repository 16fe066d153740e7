"""The ReSpinQuant acceptance table: every method x rank x weight quantizer on the same windows.

``python -m pipeline.tools.sweep --quant w4a4kv4 --set quarot=PATH --set spinquant=PATH --set layerwise=PATH``
fuses each row in memory (no checkpoint written; ``--stream``: layer by layer through a temporary
checkpoint, for a model that does not fit), evaluates WikiText-2 ppl on the eval windows of the
default pipeline (``eval.*`` in ``conf/``), and appends one CSV row as soon as it is done, so a long
sweep keeps what it finished. Rows: ``rtn`` (no rotation), the given global sets (``quarot``,
``spinquant``), ``layerwise`` (exact dense transitions), and ``respinquant`` (the paper's variant) and
``respinquant_chained`` at each ``--ranks`` value (integers, ``full``, ``adaptive``: the subspace of the
given layerwise set), each with each ``--weights``
quantizer (``rtn``, ``gptq`` on the calibration windows of ``artifacts/calib``).
"""
from __future__ import annotations

import argparse
import csv
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..infra.artifacts import load_tensors
from ..infra import devices, paths
from ..infra.config import CONF_DIR, compose_pipeline
from ..eval.data import wikitext2_windows
from ..infra.settings import calib_windows
from ..infra.errors import PipelineError, cli_errors_as_one_line
from ..fuse.fused_ppl import fused_perplexity, should_stream
from ..methods import MethodSpec, quant_spec
from ..model.load import model_fingerprint
from ..quant.quantizers import WEIGHT_METHODS
from ..model.streaming import open_model
from ..rotation.subspace import ApproxSpec, approximate_rotations, summarize

FIELDS = ["quant", "weights", "method", "rank", "mean_rank", "mean_energy", "mean_rel_error",
          "mean_basis_error", "wikitext2_ppl", "windows", "seconds", "peak_rss_mib"]
METHODS = ("rtn", "quarot", "spinquant", "layerwise", "respinquant", "respinquant_chained")


def _methods(cfg) -> dict[str, MethodSpec]:
    return {name: MethodSpec.from_cfg(cfg.variants[name].method) for name in cfg.variants}


def subspaces(layerwise: dict[str, torch.Tensor], n_layers: int, ranks: list[str], chained: bool = False,
              ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """``{rank label: (subspace tensors (float32, as the artifact stores them), summary)}`` of the paper's
    variant, or with ``chained`` of the chained one."""
    out = {}
    for rank in ranks:
        spec = ApproxSpec(rank=int(rank) if rank.isdigit() else rank)
        tensors, rows = approximate_rotations(layerwise, n_layers, spec, progress=False, chained=chained)
        out[spec.label] = ({k: v.to(torch.float32) for k, v in tensors.items()}, summarize(rows))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="w4a4kv4", help="a conf/quant name")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD=PATH",
                        help="a rotation set: quarot/spinquant (global) or layerwise (per-layer)")
    parser.add_argument("--ranks", nargs="*", default=["0", "8", "32", "128", "full", "adaptive"])
    parser.add_argument("--weights", nargs="*", default=list(WEIGHT_METHODS), choices=WEIGHT_METHODS)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", required=True, help="CSV to append rows to")
    parser.add_argument("--stream", default="auto", type=lambda v: {"true": True, "false": False}.get(v, v),
                        help="fuse and evaluate layer by layer: true | false | auto (when the model does not fit)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pipeline.yaml")
    args = parser.parse_args(argv)
    cli_errors_as_one_line(run, args)


def parse_sets(specs: list[str]) -> dict[str, str]:
    """``["quarot=PATH", ...]`` -> ``{"quarot": "PATH"}``; only the methods the sweep knows."""
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in ("quarot", "spinquant", "layerwise") or not path:
            raise PipelineError(f"--set {spec}: give quarot=PATH, spinquant=PATH or layerwise=PATH")
        sets[name] = path
    return sets


def run(args: argparse.Namespace) -> None:
    sets = parse_sets(args.set)
    if not (CONF_DIR / "quant" / f"{args.quant}.yaml").is_file():
        raise PipelineError(f"--quant {args.quant}: no conf/quant/{args.quant}.yaml")
    cfg = compose_pipeline([f"quant@variants.rtn.quant={args.quant}", *args.overrides])
    methods = _methods(cfg)
    base_quant = quant_spec(cfg.variants.rtn.quant)
    device, dtype = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    stream = should_stream(args.stream, "--stream", cfg.model, device, dtype)
    model, tok, _ = open_model(cfg.model, dtype)  # the skeleton: fingerprint and sizes; every row loads its own
    fingerprint = model_fingerprint(model)
    dims = model.config
    windows, _ = wikitext2_windows(cfg.data, tok, cfg.eval.seqlen, cfg.eval.max_windows)
    windows = windows.to(device)
    calib = calib_windows(paths.calib_windows(cfg), cfg, fingerprint).to(device) if "gptq" in args.weights else None
    rotations = {name: load_tensors(path, fingerprint)[0] for name, path in sets.items()}
    rows: list[tuple[str, MethodSpec, dict, dict | None, dict]] = [("rtn", methods["rtn"], {}, None, {})]
    for name in ("quarot", "spinquant", "layerwise"):
        if name in rotations:
            rows.append((name, methods[name], rotations[name], None, {}))
    for name in ("respinquant", "respinquant_chained"):
        if "layerwise" not in rotations or name not in args.methods:
            continue
        method = methods[name]
        for label, (sub, summary) in subspaces(rotations["layerwise"], dims.num_hidden_layers, args.ranks,
                                               method.chained).items():
            rows.append((name, method, rotations["layerwise"], sub, {"rank": label, **summary}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for weights in args.weights:
            quant = replace(base_quant, weight_method=weights)
            for name, method, rot, sub, extra in rows:
                if name not in args.methods:
                    continue
                start = time.perf_counter()
                label = f"{args.quant} {weights} {name} {extra.get('rank', '')}"
                ppl = fused_perplexity(cfg.model, method, rot, quant, sub, calib, windows, device, dtype, stream, label)
                writer.writerow({
                    "quant": args.quant, "weights": weights, "method": name, "rank": extra.get("rank", ""),
                    "mean_rank": extra.get("approx_mean_rank", ""), "mean_energy": extra.get("approx_mean_energy", ""),
                    "mean_rel_error": extra.get("approx_mean_rel_error", ""),
                    "mean_basis_error": extra.get("approx_mean_basis_error", ""), "wikitext2_ppl": f"{ppl:.4f}",
                    "windows": windows.shape[0], "seconds": f"{time.perf_counter() - start:.1f}",
                    "peak_rss_mib": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}",
                })
                f.flush()
                print(f"{label}: ppl {ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
