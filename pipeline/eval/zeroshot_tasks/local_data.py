"""Datasets for the ``rsq_*`` lm-eval tasks: local files as the rows of the HF dataset lm-eval reads.

lm-eval calls a task's ``custom_dataset(**metadata, **dataset_kwargs)``; ``pipeline.eval.zeroshot`` puts the
data dir (``pipeline.eval.data.data_dir``) into the TaskManager's metadata as ``data_dir`` (None: HF hub).
Each loader returns ``DatasetDict({split: Dataset})`` whose columns are those of the standard task's
HF dataset (``allenai/ai2_arc``, ``baber/piqa``, ...), so the YAMLs keep lm-eval's standard
``doc_to_*`` templates unchanged. Only WinoGrande differs: the local copy is llm-foundry's converted
form (see ``winogrande``). Missing data raises ``PipelineError`` with one line.

Loaded by lm-eval from this file (``!function local_data.<name>``), not as a package module.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets

from pipeline.infra.errors import PipelineError


def _path(data_dir: str, rel: str) -> Path:
    path = Path(data_dir) / rel
    if not path.is_file():
        raise PipelineError(f"{path} is missing: the data dir must hold {rel} (see ../shared/data/README.md)")
    return path


def _jsonl(data_dir: str, rel: str) -> list[dict]:
    with _path(data_dir, rel).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(data_dir: str, rel: str, n: int) -> list[str]:
    """One label per line of a ``.lst`` file, line-aligned with the ``n`` items of its jsonl."""
    labels = _path(data_dir, rel).read_text(encoding="utf-8").split()
    if len(labels) != n:
        raise PipelineError(f"{Path(data_dir) / rel} has {len(labels)} labels for {n} items")
    return labels


def _one_split(split: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _hub(path: str, name: str | None, split: str,
         hint: str = "set data.dir= or RSQ_DATA_DIR") -> datasets.DatasetDict:
    """The standard task's own HF dataset split (no data dir configured; HellaSwag without its file)."""
    try:
        return datasets.DatasetDict({split: datasets.load_dataset(path, name, split=split)})
    except Exception as exc:  # any hub/cache failure becomes one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PipelineError(f"{path} {split} is not available from the HF hub or its cache "
                            f"({type(exc).__name__}: {first}); {hint}") from exc


def _arc(data_dir: str | None, subset: str) -> datasets.DatasetDict:
    if data_dir is None:
        return _hub("allenai/ai2_arc", subset, "test")
    rows = [{
        "id": r["id"],
        "question": r["question"]["stem"],
        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]]},
        "answerKey": r["answerKey"],
    } for r in _jsonl(data_dir, f"arc/{subset}-Test.jsonl")]
    return _one_split("test", rows)


def arc_easy(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """ARC-Easy test (2376) in the ``allenai/ai2_arc`` schema."""
    return _arc(data_dir, "ARC-Easy")


def arc_challenge(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """ARC-Challenge test (1172) in the ``allenai/ai2_arc`` schema."""
    return _arc(data_dir, "ARC-Challenge")


def piqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """PIQA validation (1838) in the ``baber/piqa`` schema (``label`` int 0/1 from ``valid-labels.lst``)."""
    if data_dir is None:
        return _hub("baber/piqa", None, "validation")
    items = _jsonl(data_dir, "piqa/valid.jsonl")
    labels = _labels(data_dir, "piqa/valid-labels.lst", len(items))
    rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(items, labels)]
    return _one_split("validation", rows)


def siqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """Social IQa dev (1954) in the ``lighteval/siqa`` schema (``label`` the string "1".."3")."""
    if data_dir is None:
        return _hub("lighteval/siqa", None, "validation")
    items = _jsonl(data_dir, "siqa/dev.jsonl")
    labels = _labels(data_dir, "siqa/dev-labels.lst", len(items))
    keys = ("context", "question", "answerA", "answerB", "answerC")
    rows = [{**{k: r[k] for k in keys}, "label": y} for r, y in zip(items, labels)]
    return _one_split("validation", rows)


def boolq(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """BoolQ val (3270) in the ``super_glue/boolq`` schema (``label`` int; the local file has "true"/"false")."""
    if data_dir is None:
        return _hub("aps/super_glue", "boolq", "validation")
    rows = []
    for r in _jsonl(data_dir, "boolq/val.jsonl"):
        if str(r["label"]).lower() not in ("true", "false"):
            raise PipelineError(f"boolq/val.jsonl idx {r['idx']}: label {r['label']!r} is not true/false")
        rows.append({"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                     "label": int(str(r["label"]).lower() == "true")})
    return _one_split("validation", rows)


def lambada_openai(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test (5153) in the ``EleutherAI/lambada_openai`` schema: ``{"text"}``."""
    if data_dir is None:
        return _hub("EleutherAI/lambada_openai", "default", "test")
    rows = [{"text": r["text"]} for r in _jsonl(data_dir, "lambada_openai/lambada_test.jsonl")]
    return _one_split("test", rows)


_OBQA_CHOICE = re.compile(r"\s*\(([A-D])\)\s*")


def openbookqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """OpenBookQA main test (500) in the ``allenai/openbookqa`` schema, from the release ``test.tsv``.

    The TSV gives the four choices as one string ``(A) … (B) … (C) … (D) …``; it is split on the markers.
    """
    if data_dir is None:
        return _hub("allenai/openbookqa", "main", "test")
    path = _path(data_dir, "openbookqa/test.tsv")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            parts = _OBQA_CHOICE.split(" " + r["Choices"])
            labels, texts = parts[1::2], parts[2::2]
            if labels != ["A", "B", "C", "D"] or parts[0]:
                raise PipelineError(f"{path} item {r['ID']}: choices {r['Choices'][:60]!r} are not (A)..(D)")
            rows.append({"id": r["ID"], "question_stem": r["Question Stem"],
                         "choices": {"text": texts, "label": labels}, "answerKey": r["Answer Key"]})
    return _one_split("test", rows)


def winogrande(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """WinoGrande xl dev (1267) as ``{"context_options": [2 str], "continuation": str, "answer": "1"|"2"}``.

    ``context_options[i]`` is the sentence up to the blank with option i filled in and ``continuation``
    the stripped text after it: exactly lm-eval's ``doc_to_choice`` / ``doc_to_target``, precomputed by
    llm-foundry. ``answer`` comes from the original ``dev-labels.lst`` and must equal llm-foundry's gold + 1.
    From the hub (no data dir) the original rows are split the same way here.
    """
    if data_dir is None:
        split = _hub("allenai/winogrande", "winogrande_xl", "validation")["validation"]
        rows = []
        for r in split:
            blank = r["sentence"].index("_")
            rows.append({"context_options": [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]],
                         "continuation": r["sentence"][blank + 1:].strip(), "answer": r["answer"]})
        return _one_split("validation", rows)
    items = _jsonl(data_dir, "winogrande/winogrande.llmfoundry.jsonl")
    labels = _labels(data_dir, "winogrande/dev-labels.lst", len(items))
    rows = []
    for i, (r, y) in enumerate(zip(items, labels)):
        if int(y) != r["gold"] + 1:
            raise PipelineError(f"winogrande item {i}: dev-labels.lst says {y}, llm-foundry gold {r['gold']}")
        rows.append({"context_options": list(r["context_options"]), "continuation": r["continuation"], "answer": y})
    return _one_split("validation", rows)


HELLASWAG_FILE = "hellaswag/hellaswag_val.jsonl"


def hellaswag(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """HellaSwag validation (10042) in the ``Rowan/hellaswag`` schema (``label`` a string).

    From ``<data dir>/hellaswag/hellaswag_val.jsonl`` (the original rowanz release) when present, else the
    HF hub or its cache; with neither it raises ``PipelineError`` (``pipeline.eval.zeroshot`` then skips it).
    """
    if data_dir is None or not (Path(data_dir) / HELLASWAG_FILE).is_file():
        return _hub("Rowan/hellaswag", None, "validation",
                    hint=f"put the original hellaswag_val.jsonl at <data dir>/{HELLASWAG_FILE}")
    rows = _jsonl(data_dir, HELLASWAG_FILE)
    for i, r in enumerate(rows):
        missing = {"activity_label", "ctx_a", "ctx_b", "endings", "label"} - r.keys()
        if missing:
            raise PipelineError(f"{Path(data_dir) / HELLASWAG_FILE} line {i + 1} lacks {sorted(missing)}")
    return _one_split("validation", [{**r, "label": str(r["label"])} for r in rows])
