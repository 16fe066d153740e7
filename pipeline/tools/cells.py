"""The experiment matrix in resumable cells: ``python -m pipeline.tools.cells [--deadline MIN] [--commit]``.

A *cell* is one (model, quant, weight quantizer, seed) chain of ``conf/matrix.yaml``: calibrate, the
training its variants need, and each variant fused and evaluated right after the set it needs (the
stage scripts of ``dvc repro``, run in DVC's order with the cell's composed config). Every finished
variant is one *result*::

    metrics/cells/<model>/<quant>-<weights>/seed<k>/<variant>.json

written atomically as soon as its eval ends, and committed at once with ``--commit``. A result holds
the resolved config it was made under (``config``, and ``config_sha256`` over it), the perplexity, the
per-window NLLs (the report's paired statistics), the commit, the host's CPU and the wall time of every
stage it took. The runner

- skips every variant whose result is there with the same ``config_sha256`` (a fresh clone resumes
  from the committed results and reruns no finished variant);
- runs the rest one at a time; a stage that already finished in this checkout's scratch folder
  (``runs/cells/...``, with a marker holding the same config hash) is not run again, so a run stopped
  between stages resumes at the next stage;
- with ``--deadline MIN``, stops cleanly before a variant whose estimated time (the stage times of
  earlier results of the same quant and weights, else ``DEFAULT_SECONDS``) would end past the deadline.

A killed run loses at most the variant in progress. ``--dry-run`` prints the plan and the estimates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from ..infra.artifacts import write_json
from ..infra.config import CONF_DIR, REPO_ROOT, compose_pipeline, select_variant
from ..infra.errors import PipelineError, cli_errors_as_one_line
from ..infra.settings import NOT_RESULT
from .seed_runs import stage_plan

MATRIX_FILE = CONF_DIR / "matrix.yaml"
RESULTS_DIR = Path("metrics") / "cells"
SCRATCH_DIR = Path("runs") / "cells"
# seconds per stage on 2 idle cores (bf16, SmolLM2-135M, quick training, GPTQ, 32 eval windows): the
# estimate until a result of the same quant and weights has measured them
DEFAULT_SECONDS = {"calibrate": 60, "train_rotation:global": 240, "train_rotation:layerwise": 420,
                   "approximate": 60, "fuse": 180, "eval": 150}
# the version of what stage artifacts record (2: their setting; 3: per-tensor digests and a fingerprint
# that covers the weights); a change reruns the stages of unfinished cells (stage markers), never a
# finished result
ARTIFACT_FORMAT = 3
# settings that change where or how fast a stage runs, not what it computes
_NOT_IN_HASH = {"train": NOT_RESULT["train"],
                "eval": ("stream", "batch_size", "tasks", "limit")}


@dataclass(frozen=True)
class Cell:
    """One (model, quant, weights, seed) chain and the variants it evaluates."""

    model: str
    quant: str
    weights: str
    seed: int
    variants: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.model}/{self.quant}-{self.weights}/seed{self.seed}"

    def result_path(self, variant: str, results: Path) -> Path:
        return results / self.key / f"{variant}.json"

    def scratch(self, root: Path) -> Path:
        return root / self.key


def load_matrix(path: Path = MATRIX_FILE) -> dict:
    """``conf/matrix.yaml``, checked: one line naming the bad key otherwise."""
    if not path.is_file():
        raise PipelineError(f"{path}: no matrix file")
    matrix = yaml.safe_load(path.read_text()) or {}
    for key in ("model", "dtype", "eval_windows", "groups"):
        if key not in matrix:
            raise PipelineError(f"{path}: `{key}` is missing")
    for i, group in enumerate(matrix["groups"]):
        missing = [k for k in ("quants", "weights", "seeds", "variants") if not group.get(k)]
        if missing:
            raise PipelineError(f"{path}: groups[{i}] lacks {', '.join(missing)}")
        if group["weights"] not in ("rtn", "gptq"):
            raise PipelineError(f"{path}: groups[{i}].weights={group['weights']}: choose rtn or gptq")
        if any(not isinstance(s, int) or s < 0 for s in group["seeds"]):
            raise PipelineError(f"{path}: groups[{i}].seeds must be integers >= 0")
    return matrix


def cells_of(matrix: dict) -> list[Cell]:
    """The matrix's cells in run order: group by group, seed by seed, quant by quant (a cell listed
    twice keeps its first place and the union of its variants)."""
    order: dict[tuple, list[str]] = {}
    for group in matrix["groups"]:
        for seed in group["seeds"]:
            for quant in group["quants"]:
                variants = order.setdefault((matrix["model"], quant, group["weights"], seed), [])
                variants += [v for v in group["variants"] if v not in variants]
    return [Cell(*k, tuple(v)) for k, v in order.items()]


def cell_config(cell: Cell, matrix: dict, scratch: Path) -> DictConfig:
    """The cell's composed pipeline config: every variant of the cell on the cell's quant and weight
    quantizer, the cell's seed, the pinned dtype, ppl only on ``eval_windows`` windows, and the
    artifacts and stage metrics under the cell's scratch folder."""
    overrides = [f"model={cell.model}", f"seed={cell.seed}", f"model.dtype={matrix['dtype']}",
                 f"eval.max_windows={matrix['eval_windows']}", "eval.tasks=[]", *matrix.get("overrides", [])]
    cfg = compose_pipeline(overrides)
    unknown = [v for v in cell.variants if v not in cfg.variants]
    if unknown:
        raise PipelineError(f"{MATRIX_FILE.name}: variant(s) {', '.join(unknown)} not in conf/pipeline.yaml's variants")
    quant = OmegaConf.load(CONF_DIR / "quant" / f"{cell.quant}.yaml") if (CONF_DIR / "quant" / f"{cell.quant}.yaml").is_file() else None
    if quant is None:
        raise PipelineError(f"{MATRIX_FILE.name}: quant {cell.quant}: no conf/quant/{cell.quant}.yaml")
    with open_dict(cfg):
        for name in cfg.variants:
            if name != "fp16":  # the 16-bit reference stays 16-bit
                cfg.variants[name].quant = OmegaConf.merge(quant, {"weight_method": cell.weights})
        cfg.paths.artifacts = str(cell.scratch(scratch) / "artifacts")
        cfg.paths.metrics = str(cell.scratch(scratch) / "metrics")
    return cfg


def _chain(cfg: DictConfig, variant: str) -> list[str]:
    """``variant`` and the variants whose trained sets it reads (global_from, layerwise_from), in order."""
    names, todo = [], [variant]
    while todo:
        name = todo.pop(0)
        if name in names:
            continue
        names.append(name)
        chosen = cfg.variants[name]
        todo += [chosen[k] for k in ("global_from", "layerwise_from") if chosen.get(k)]
    return names


def result_config(cfg: DictConfig, cell: Cell, variant: str) -> dict:
    """What a result of ``variant`` depends on (resolved): the hash of this is the skip key."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for group, keys in _NOT_IN_HASH.items():
        for k in keys:
            resolved[group].pop(k, None)
    chain = {name: {k: resolved["variants"][name].get(k) for k in ("method", "quant", "approx", "global_from",
                                                                     "layerwise_from")}
             for name in _chain(cfg, variant)}
    return {"model": resolved["model"], "data": resolved["data"], "calib": resolved["calib"],
            "train": resolved["train"], "eval": {k: resolved["eval"][k] for k in ("seqlen", "max_windows", "corpus")},
            "seed": cell.seed, "variant": variant, "variants": chain}


def cell_config_key(cfg: DictConfig, cell: Cell) -> dict:
    """What the cell's stages depend on (the stage markers' key): ``result_config`` of every variant of the
    config, so a change of reporting, benchmark or path settings does not invalidate finished stages."""
    resolved = result_config(cfg, cell, cell.variants[0])
    resolved.pop("variant")
    # artifacts made before they recorded their setting and data digest are not read by today's stages
    resolved["artifact_format"] = ARTIFACT_FORMAT
    all_variants = OmegaConf.to_container(cfg.variants, resolve=True)
    resolved["variants"] = {name: {k: v.get(k) for k in ("method", "quant", "approx", "global_from", "layerwise_from")}
                            for name, v in all_variants.items()}
    return resolved


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def finished(path: Path, digest: str) -> bool:
    """Whether the result at ``path`` is there and was made under config ``digest``."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("config_sha256") == digest
    except (OSError, json.JSONDecodeError):
        return False


def stage_key(stage: str, args: list[str]) -> str:
    """A plan step's name for markers and estimates, e.g. ``train_rotation:layerwise`` / ``fuse``."""
    if stage == "train_rotation":
        return "train_rotation:" + next(a.split("=", 1)[1] for a in args if a.startswith("rotation_stage="))
    return stage


def run_stage_command(cmd: list[str]) -> int:
    """Run one stage (``[python, stages/<stage>.py, ...]``) from the repo root, its output on ours; its
    exit status. (The tests replace it with a runner that forks stages from preloaded imports.)"""
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def _marker(scratch: Path, stage: str, args: list[str]) -> Path:
    return scratch / "done" / ("_".join([stage, *(a.replace("=", "-") for a in args)]) + ".json")


def stage_done(scratch: Path, stage: str, args: list[str], cell_digest: str) -> dict | None:
    """The marker of a stage that finished in the cell's scratch folder ``scratch`` under the same cell
    config, else None."""
    path = _marker(scratch, stage, args)
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if marker.get("cell_sha256") == cell_digest else None


def measured_seconds(results: Path, quant: str, weights: str) -> dict[str, float]:
    """Median stage seconds over the results of ``quant``/``weights`` under ``results`` (any model, seed)."""
    seen: dict[str, list[float]] = {}
    for path in results.glob(f"*/{quant}-{weights}/seed*/*.json"):
        try:
            stages = json.loads(path.read_text()).get("stage_seconds", {})
        except (OSError, json.JSONDecodeError):
            continue
        for key, seconds in stages.items():
            seen.setdefault(key.split(" ")[0], []).append(float(seconds))
    return {k: sorted(v)[len(v) // 2] for k, v in seen.items()}


def host_cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """HEAD's hash, ``+dirty`` when pipeline/, stages/ or conf/ differ from it (empty outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "stages", "conf"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def commit_result(path: Path, message: str, tries: int = 20) -> bool:
    """``git add`` + ``git commit`` of ``path`` alone (other staged changes stay staged); retried while
    another git process holds the index lock. False (with a warning) when it cannot be committed."""
    rel = str(path.relative_to(REPO_ROOT))
    for _ in range(tries):
        add = subprocess.run(["git", "add", "--", rel], cwd=REPO_ROOT, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "--no-verify", "-m", message, "--", rel], cwd=REPO_ROOT, capture_output=True,
            text=True).returncode == 0
        if done:
            return True
        if "index.lock" not in add.stderr + add.stdout:
            time.sleep(1.0)
        time.sleep(2.0)
    print(f"warning: could not commit {rel}; commit it by hand", file=sys.stderr, flush=True)
    return False


class Runner:
    """Runs cells' variants one at a time under an optional deadline (module doc)."""

    def __init__(self, matrix: dict, deadline_s: float | None, commit: bool, dry_run: bool,
                 results: Path = REPO_ROOT / RESULTS_DIR, scratch: Path = REPO_ROOT / SCRATCH_DIR) -> None:
        self.matrix, self.commit, self.dry_run = matrix, commit, dry_run
        self.results, self.scratch = results, scratch
        self.start = time.monotonic()
        self.deadline_s = deadline_s

    def left(self) -> float:
        return float("inf") if self.deadline_s is None else self.deadline_s - (time.monotonic() - self.start)

    def run(self, cells: list[Cell]) -> int:
        """Run every unfinished variant of ``cells``; the number of results written."""
        written = 0
        for cell in cells:
            cfg, scratch = cell_config(cell, self.matrix, self.scratch), cell.scratch(self.scratch)
            cell_digest = config_sha256(cell_config_key(cfg, cell))
            todo = []
            for variant in cell.variants:
                digest = config_sha256(result_config(cfg, cell, variant))
                if finished(cell.result_path(variant, self.results), digest):
                    print(f"{cell.key} {variant}: done (committed result matches)", flush=True)
                else:
                    todo.append((variant, digest))
            if not todo:
                continue
            if not self.dry_run:
                scratch.mkdir(parents=True, exist_ok=True)
                (scratch / "params.yaml").write_text(
                    yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False))
            estimates = {**DEFAULT_SECONDS, **measured_seconds(self.results, cell.quant, cell.weights)}
            planned: set[tuple[str, tuple[str, ...]]] = set()  # stages an earlier variant of this cell runs
            for variant, digest in todo:
                plan = stage_plan(cfg, [variant])
                pending = [(s, a) for s, a in plan
                           if (s, tuple(a)) not in planned and not stage_done(scratch, s, a, cell_digest)]
                planned.update((s, tuple(a)) for s, a in plan)
                estimate = sum(estimates.get(stage_key(s, a), 300) for s, a in pending)
                print(f"{cell.key} {variant}: {len(pending)} of {len(plan)} stages to run, about "
                      f"{estimate / 60:.1f} min", flush=True)
                if estimate > self.left():
                    print(f"deadline: {self.left() / 60:.1f} min left, not starting {cell.key} {variant} "
                          f"(about {estimate / 60:.1f} min)", flush=True)
                    return written
                if self.dry_run:
                    continue
                self.run_variant(cell, cfg, variant, plan, cell_digest, digest)
                written += 1
        return written

    def run_variant(self, cell: Cell, cfg: DictConfig, variant: str, plan: list[tuple[str, list[str]]],
                    cell_digest: str, digest: str) -> None:
        """Run (or reuse) ``plan``'s stages, then write and commit ``variant``'s result."""
        seconds: dict[str, float] = {}
        scratch = cell.scratch(self.scratch)
        for stage, args in plan:
            marker = stage_done(scratch, stage, args, cell_digest)
            label = " ".join([stage_key(stage, args), *(a for a in args if a.startswith("variant="))])
            if marker is not None:
                seconds[label] = marker["seconds"]
                continue
            print(f"{cell.key} {variant}: {stage} {' '.join(args)}", flush=True)
            cmd = [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), "-cd", str(scratch), "-cn",
                   "params", *args]
            begin = time.monotonic()
            if run_stage_command(cmd) != 0:
                raise PipelineError(f"{cell.key} {variant}: stage {stage} {' '.join(args)} failed (its message is above)")
            seconds[label] = round(time.monotonic() - begin, 1)
            write_json(_marker(scratch, stage, args), {"cell_sha256": cell_digest, "seconds": seconds[label]})
        path = self.write_result(cell, cfg, variant, digest, seconds)
        ppl = json.loads(path.read_text())["wikitext2_ppl"]
        print(f"{cell.key} {variant}: ppl {ppl:.3f} -> {path}", flush=True)
        if self.commit:
            commit_result(path, f"cells: {cell.key} {variant} ppl {ppl:.3f}")

    def write_result(self, cell: Cell, cfg: DictConfig, variant: str, digest: str,
                     seconds: dict[str, float]) -> Path:
        """Assemble the variant's result from its eval stage's files (atomic write)."""
        metrics = Path(cfg.paths.metrics)
        evaluated = json.loads((metrics / "eval" / f"{variant}.json").read_text())
        windows = json.loads((metrics / "eval_windows" / f"{variant}.json").read_text())
        _, chosen = select_variant(OmegaConf.merge(cfg, {"variant": variant}))
        result = {
            "cell": cell.key, "model": cell.model, "variant": variant, "method": chosen.method.name,
            "quant": cell.quant, "weights": cell.weights, "seed": cell.seed, "dtype": str(cfg.model.dtype),
            "windows": evaluated["wikitext2_windows"], "seqlen": evaluated["wikitext2_seqlen"],
            "corpus": evaluated["corpus"], "corpus_sha256": evaluated["wikitext2_text_sha256"],
            "wikitext2_ppl": evaluated["wikitext2_ppl"], "window_nll": windows["window_nll"],
            "commit": git_commit(), "host_cpu": host_cpu(), "stage_seconds": seconds,
            "wall_seconds": round(sum(seconds.values()), 1),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config_sha256": digest, "config": result_config(cfg, cell, variant),
        }
        path = cell.result_path(variant, self.results)
        write_json(path, result)
        return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(MATRIX_FILE), help="the matrix file (default conf/matrix.yaml)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="minutes from now: start no variant whose estimated time ends past it")
    parser.add_argument("--commit", action="store_true", help="git-commit each result as it is written")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimates, run nothing")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="where results go (default metrics/cells)")
    parser.add_argument("--scratch", default=str(SCRATCH_DIR), help="artifacts and stage markers (default runs/cells)")
    parser.add_argument("--only", nargs="+", default=None, metavar="KEY",
                        help="run only cells whose key contains one of these, e.g. w4a4kv4-gptq/seed0")
    args = parser.parse_args(argv)

    def body(a: argparse.Namespace) -> None:
        if a.deadline is not None and not a.deadline > 0:
            raise PipelineError(f"--deadline {a.deadline}: give minutes > 0")
        matrix = load_matrix(Path(a.matrix))
        cells = cells_of(matrix)
        if a.only:
            cells = [c for c in cells if any(k in c.key for k in a.only)]
            if not cells:
                raise PipelineError(f"--only {' '.join(a.only)}: matches no cell of {a.matrix}")
        runner = Runner(matrix, None if a.deadline is None else a.deadline * 60, a.commit, a.dry_run,
                        REPO_ROOT / a.results, REPO_ROOT / a.scratch)
        written = runner.run(cells)
        print(f"{written} result(s) written", flush=True)

    cli_errors_as_one_line(body, args)


if __name__ == "__main__":
    main()
