"""Zero-shot accuracy with lm-eval on an in-memory model (DESIGN §1 evaluation protocol).

Tasks are lm-eval's standard definitions (same prompts, choices, targets, metrics), re-declared as
``rsq_<task>`` in ``pipeline/eval/zeroshot_tasks/`` so they read the local data dir. The dir reaches each
task's ``custom_dataset`` loader (``zeroshot_tasks/local_data.py``) through the TaskManager's
``metadata={"data_dir": ...}``, so no YAML holds a path; without a data dir the loaders read the
standard HF datasets. HellaSwag has no copy in ``../shared/data``: without
``<data dir>/hellaswag/hellaswag_val.jsonl`` or the hub it is skipped with one warning.

Headline metric per task: ``acc_norm`` where the standard task defines it (ARC, PIQA, OpenBookQA,
HellaSwag), else ``acc``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from .data import data_dir
from ..infra.errors import PipelineError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "zeroshot_tasks"
# short name -> headline metric; the lm-eval task is "rsq_<short name>"
HEADLINE = {
    "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "hellaswag": "acc_norm",
    "openbookqa": "acc_norm", "winogrande": "acc", "lambada_openai": "acc", "boolq": "acc", "siqa": "acc",
}
ALL_TASKS = list(HEADLINE)
OPTIONAL = {"hellaswag"}  # skipped, not an error, when its data cannot be had


class _DropMetadataNotice(logging.Filter):
    """lm-eval tells, per custom_dataset task, that kwargs can come via metadata: ours already do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def load_tasks(data_cfg: DictConfig | dict, tasks: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The lm-eval ``ConfigurableTask`` of each short name (data loaded), and the optional ones skipped.

    Raises PipelineError for an unknown name or missing data of a required task.
    """
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in HEADLINE]
    if unknown or not tasks:
        raise PipelineError(f"unknown zero-shot task(s) {unknown or '(none given)'}; choose from {ALL_TASKS}")
    root = data_dir(data_cfg)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": None if root is None else str(root)})
    loaded, skipped = {}, []
    quiet, task_log = _DropMetadataNotice(), logging.getLogger("lm_eval.api.task")
    task_log.addFilter(quiet)
    try:
        for name in dict.fromkeys(tasks):
            try:
                loaded[name] = manager.load([f"rsq_{name}"])["tasks"][f"rsq_{name}"]
            except PipelineError as exc:
                if name not in OPTIONAL:
                    raise
                log.warning("zero-shot: skipping %s: %s", name, exc)
                skipped.append(name)
    finally:
        task_log.removeFilter(quiet)
    return loaded, skipped


def check_request(tasks: list[str], limit: int | None, batch_size: int) -> None:
    """Refuse (one line) unknown task names, a bad limit or batch size, before any model work."""
    unknown = [t for t in tasks if t not in HEADLINE]
    if unknown or not tasks:
        raise PipelineError(f"unknown zero-shot task(s) {unknown or '(none given)'}; choose from {ALL_TASKS}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise PipelineError(f"zero-shot limit must be a positive integer or None (all items), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"zero-shot batch_size must be a positive integer, got {batch_size!r}")


def evaluate_zeroshot(model: nn.Module, tokenizer, data_cfg: DictConfig | dict, tasks: list[str],
                      limit: int | None = None, batch_size: int = 8, seed: int = 0) -> dict:
    """Zero-shot accuracies of a causal LM (``model(ids).logits``: ``(batch, seq, vocab)``).

    ``tasks``: short names from ``ALL_TASKS``; ``limit``: first N items of each task (None: all);
    ``batch_size``: lm-eval loglikelihood batch. The model runs where it is (CPU float32 here).
    Returns a flat dict: ``zeroshot_avg`` (mean of the headlines of the tasks that ran), ``<task>``
    (headline), ``<task>_acc`` / ``<task>_acc_norm`` / ``<task>_perplexity`` where the task has them,
    ``zeroshot_limit`` (None for all items), ``zeroshot_tasks`` (the short names that ran) and
    ``zeroshot_skipped`` (those skipped for want of data). Only the float values are metrics.
    Raises PipelineError for an unknown task, a bad limit or a missing file of a required task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_request(tasks, limit, batch_size)
    loaded, skipped = load_tasks(data_cfg, tasks)
    if not loaded:
        raise PipelineError(f"no zero-shot task could run (skipped: {', '.join(skipped)})")

    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # HFLM calls model.tie_weights(): a rotated model must have been untied (surgery.untie_embeddings)
    if {name: p.data_ptr() for name, p in model.named_parameters()} != storage:
        raise PipelineError("lm-eval re-tied the model's embeddings: untie it first (config.tie_word_embeddings=False)")
    # the tasks come built; a bare manager keeps simple_evaluate from indexing lm-eval's 7 s of defaults
    out = simple_evaluate(model=lm, tasks=list(loaded.values()), num_fewshot=0, limit=limit,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    results: dict = {}
    for name in loaded:
        metrics = out["results"][f"rsq_{name}"]
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in metrics:
                results[f"{name}_{metric}"] = float(metrics[f"{metric},none"])
        results[name] = results[f"{name}_{HEADLINE[name]}"]
    results["zeroshot_avg"] = sum(results[name] for name in loaded) / len(loaded)
    results["zeroshot_limit"] = limit
    results["zeroshot_tasks"] = list(loaded)
    results["zeroshot_skipped"] = skipped
    return results
