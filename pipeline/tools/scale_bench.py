"""Peak memory and time of each pipeline stage on a model *shape* with **random weights**.

Memory and time do not depend on weight values, so a random-init checkpoint of a real shape measures
what the real model costs without its weights (perplexities of such a model mean nothing and are not
reported):

    python -m pipeline.tools.scale_bench --shape llama3_8b --out docs/scale.json

writes the checkpoint once (bf16 safetensors, one shard per decoder layer, under
``$RSQ_CACHE_DIR/random/<shape>-seed0``; its config names it ``random``), runs each stage as its own
process with the stage script's own overrides, and appends one row per stage to ``--out``:
``{"shape", "stage", "device", "dtype", "peak_rss_gib", "peak_gpu_gib", "seconds", "command", "weights"}``.
Peak RSS is the stage process's own (``wait4``); ``peak_gpu_gib`` is null on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..infra.config import REPO_ROOT
from ..infra.errors import PipelineError
from .train_profile import SHAPES as PROFILE_SHAPES
from ..model.load import byte_tokenizer, cache_dir
from ..model.streaming import INDEX, empty_model

SHAPES = {
    "llama3_8b": PROFILE_SHAPES["llama3_8b"],
    # Llama-3-8B's sizes cut to 2 decoder layers: a streamed stage's peak memory does not depend on the
    # layer count, and its time grows with it (x 16 for the 32 layers)
    "llama3_8b_2layers": {**PROFILE_SHAPES["llama3_8b"], "num_hidden_layers": 2},
    # Llama-3-70B's sizes cut to 2 decoder layers: its per-layer working set, to project 70B on one GPU
    "llama3_70b_2layers": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                               num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny_llama": PROFILE_SHAPES["tiny_llama"],
}
STAGES = ("calibrate", "rotate_global", "rotate_layerwise", "approximate", "fuse", "eval")


def write_random_checkpoint(shape: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random-init HF folder of ``shape`` (safetensors, one shard per decoder layer), written one
    layer at a time (memory: one layer); kept if it is there already."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if (folder / INDEX).is_file():
        return folder
    hf = dict(SHAPES[shape])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    skeleton = empty_model(config, dtype)
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, t in skeleton.state_dict().items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, []).append((name, tuple(t.shape)))
    weight_map = {}
    for j, (part, entries) in enumerate(groups.items()):
        file = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp in entries:
            if name.endswith("norm.weight"):
                tensors[name] = (torch.rand(shp, generator=gen) + 0.5).to(dtype)
            else:
                tensors[name] = (torch.randn(shp, generator=gen) * 0.02).to(dtype)
        save_file(tensors, str(staging / file), metadata={"format": "pt", "weights": "random"})
        weight_map.update({k: file for k in tensors})
        del tensors
    (staging / INDEX).write_text(json.dumps({"metadata": {"weights": "random"}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(staging)
    byte_tokenizer().save_pretrained(staging)
    os.replace(staging, folder)
    return folder


def stage_command(stage: str, folder: Path, work: Path, args: argparse.Namespace) -> list[str]:
    """The stage script and overrides of one benchmark stage (a hand run of that stage)."""
    common = ["+model=llama3", f"model.path={folder}", f"model.name={args.shape}_random",
              f"model.dtype={args.dtype}", f"device={args.device}", f"paths.artifacts={work / 'artifacts'}",
              f"paths.metrics={work / 'metrics'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
              f"method={args.method}", f"calib.n_windows={args.calib_windows}", f"calib.seqlen={args.calib_seqlen}",
              "calib.stats_windows=1", f"quant.weight_method={args.weights}"]
    script = {"calibrate": "calibrate.py", "rotate_global": "train_rotation.py", "rotate_layerwise": "train_rotation.py",
              "approximate": "approximate.py", "fuse": "fuse.py", "eval": "eval.py"}[stage]
    # Every stage gets the training overrides: they are part of the setting that names and checks the
    # rotation sets, subspaces and checkpoints downstream (pipeline/infra/settings.py).
    train = [f"train.steps={args.train_steps}", "train.batch_size=1", "train.checkpoint_every=0",
             f"train.stream={args.train_stream}"]
    extra = {"rotate_layerwise": ["rotation_stage=layerwise"],
             "eval": [f"eval.max_windows={args.eval_windows}", f"eval.seqlen={args.eval_seqlen}", "eval.tasks=[]",
                      "eval.stream=true"]}.get(stage, [])
    return [sys.executable, str(REPO_ROOT / "stages" / script), *common, *train, *extra]


def applies(stage: str, method: str) -> bool:
    """Whether ``stage`` runs for ``conf/method/<method>.yaml``: rotate_layerwise for per-layer
    methods, approximate for low-rank transitions, every other stage always."""
    from omegaconf import OmegaConf

    path = REPO_ROOT / "conf" / "method" / f"{method}.yaml"
    if not path.is_file():
        raise PipelineError(f"--method {method}: no {path.relative_to(REPO_ROOT)}")
    cfg = OmegaConf.load(path)
    if stage == "rotate_layerwise":
        return bool(cfg.get("per_layer", False))
    if stage == "approximate":
        return cfg.get("transition", "dense") == "low_rank"
    return True


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, float]:
    """Run ``cmd``; its exit status, wall seconds and peak RSS in GiB (the process's own, ``wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="default: every stage that applies to --method")
    parser.add_argument("--method", default="quarot", help="a conf/method name (quarot: untrained rotations; "
                        "respinquant: every stage)")
    parser.add_argument("--weights", choices=["rtn", "gptq"], default="gptq")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-stream", default="auto", help="train.stream of the training stages")
    parser.add_argument("--eval-windows", type=int, default=1)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--work", default=None, help="artifacts/metrics of the run (default: under the cache dir)")
    parser.add_argument("--out", required=True, help="JSON list of rows to append to")
    parser.add_argument("--write-only", action="store_true", help="only write the random checkpoint")
    args = parser.parse_args(argv)

    root = cache_dir({})
    folder = root / "random" / f"{args.shape}-seed0"
    if args.write_only:
        write_random_checkpoint(args.shape, folder)
        return
    # written by a child process: a child forked from a parent that had held the random tensors
    # would start with (and report, in its peak RSS) the parent's resident set
    subprocess.run([sys.executable, "-m", "pipeline.tools.scale_bench", "--shape", args.shape, "--write-only",
                    "--out", args.out], check=True)
    work = Path(args.work or root / "scale_bench" / args.shape)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for stage in args.stages:
        if not applies(stage, args.method):
            print(f"skip {stage}: it does not apply to method {args.method}", flush=True)
            continue
        cmd = stage_command(stage, folder, work, args)
        print("+", shlex.join(cmd), flush=True)
        rc, seconds, rss = run_measured(cmd, env)
        if rc != 0:
            raise SystemExit(f"error: stage {stage} exited with {rc}")
        rows.append({"shape": args.shape, "weights": "random", "stage": stage, "device": args.device,
                     "dtype": args.dtype, "method": args.method, "quant_weights": args.weights,
                     "peak_rss_gib": round(rss, 2), "peak_gpu_gib": None, "seconds": round(seconds, 1),
                     "command": shlex.join(["python", *cmd[1:]]).replace(str(REPO_ROOT) + "/", "")})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
