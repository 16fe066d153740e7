"""Cost of the online transitions: forward time of the fake-quant model, per-layer vs global.

``python -m pipeline.tools.transition_cost --global-set PATH --layerwise-set PATH [--rank 32] [device=cuda]``
(trailing Hydra overrides of conf/pipeline.yaml; ``device`` picks where the models run) builds three
W4A4KV4 fake-quant models from the default pipeline's config: global rotation (SpinQuant, no
transitions), ReSpinQuant (rank-r transitions) and exact layer-wise (dense D x D transitions). It times
their forwards in interleaved rounds on the same WikiText-2 windows (so machine noise hits all three
alike) and prints the median time of each and its ratio to the global model, measured in this one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..infra import devices
from ..infra.artifacts import load_tensors
from ..infra.config import compose_pipeline
from ..infra.errors import cli_errors_as_one_line
from ..eval.data import wikitext2_windows
from ..methods import MethodSpec, prepare_model, quant_spec
from ..model.load import load_model, model_fingerprint
from .sweep import subspaces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-set", required=True)
    parser.add_argument("--layerwise-set", required=True)
    parser.add_argument("--rank", default="32")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pipeline.yaml (e.g. device=cuda)")
    cli_errors_as_one_line(run, parser.parse_args(argv))


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    cfg = compose_pipeline(list(getattr(args, "overrides", None) or []))
    device, _ = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    quant = quant_spec(cfg.variants.spinquant.quant)
    base, tok = load_model(cfg.model)  # fingerprint and sizes only: stays on the CPU
    fingerprint = model_fingerprint(base)
    n_layers = base.config.num_hidden_layers
    del base
    windows, _ = wikitext2_windows(cfg.data, tok, args.seqlen, args.windows)
    windows = windows.to(device)
    glob, _ = load_tensors(args.global_set, fingerprint)
    layerwise, _ = load_tensors(args.layerwise_set, fingerprint)
    (label, (sub, _)), = subspaces(layerwise, n_layers, [args.rank]).items()
    method = lambda name: MethodSpec.from_cfg(cfg.variants[name].method)  # noqa: E731
    models = {
        "global (spinquant)": prepare_model(load_model(cfg.model, device)[0], method("spinquant"), glob, quant),
        f"respinquant r={label}": prepare_model(load_model(cfg.model, device)[0], method("respinquant"), layerwise, quant, sub),
        "layerwise (dense)": prepare_model(load_model(cfg.model, device)[0], method("layerwise"), layerwise, quant),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time the kernels, not their launch
    for model in models.values():  # warm-up
        model(windows[:1], use_cache=False)
    for _ in range(args.rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            for w in windows:
                model(w[None], use_cache=False)
            sync()
            times[name].append(time.perf_counter() - start)
    ref = statistics.median(times["global (spinquant)"])
    print(f"device={device} threads={torch.get_num_threads()} windows={args.windows}x{args.seqlen} rounds={args.rounds}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} median {med:7.3f} s  ratio to global {med / ref:.4f}")


if __name__ == "__main__":
    main()
