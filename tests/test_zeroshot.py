"""Zero-shot tasks: our rsq_* tasks on the local files give what lm-eval's standard tasks give on the HF rows.

Each ``HF_ROWS`` entry is a row of the local file (by index) written by hand in the schema of the HF
dataset the standard task reads. The standard task is built from lm-eval's installed YAML with only
its dataset swapped for those rows (no download), and both tasks must send the model the same
(context, continuation) requests with the same gold.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import datasets
import lm_eval.tasks
import pytest
from conftest import SHARED_DATA, model_cfg
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from pipeline.infra.errors import PipelineError
from pipeline.model.load import load_model
from pipeline.eval.zeroshot import ALL_TASKS, HEADLINE, evaluate_zeroshot, load_tasks

STANDARD = Path(lm_eval.tasks.__file__).parent
LOCAL_TASKS = [t for t in ALL_TASKS if t != "hellaswag"]

# task -> (standard YAML under lm_eval/tasks, item count in the data README, {local index: HF row})
HF_ROWS = {
    "arc_easy": ("arc/arc_easy.yaml", 2376, {
        0: {"id": "Mercury_417466",
            "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
            "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                                 "Most ecosystems are found on land instead of in water.",
                                 "Carbon dioxide is more available than other gases.",
                                 "The producers in all ecosystems are plants."],
                        "label": ["A", "B", "C", "D"]},
            "answerKey": "A"},
        14: {"id": "NYSEDREGENTS_2015_8_28", "question": "All living and nonliving material is composed of",
             "choices": {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]},
             "answerKey": "2"},
        93: {"id": "NYSEDREGENTS_2008_4_6",
             "question": "When a rock is placed in a graduated cylinder containing water, the height of the water will",
             "choices": {"text": ["decrease", "increase", "remain the same"], "label": ["A", "B", "C"]},
             "answerKey": "B"},
    }),
    "arc_challenge": ("arc/arc_challenge.yaml", 1172, {
        0: {"id": "Mercury_7175875",
            "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
                        "Which is the most likely effect of this increase in rotation?",
            "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                                 "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                        "label": ["A", "B", "C", "D"]},
            "answerKey": "C"},
        44: {"id": "NYSEDREGENTS_2008_8_34",
             "question": "Which statement best describes the energy changes that occur while a child is riding "
                         "on a sled down a steep, snow-covered hill?",
             "choices": {"text": ["Kinetic energy decreases and potential energy increases.",
                                  "Kinetic energy increases and potential energy decreases.",
                                  "Both potential energy and kinetic energy decrease.",
                                  "Both potential energy and kinetic energy increase."],
                         "label": ["1", "2", "3", "4"]},
             "answerKey": "2"},
        121: {"id": "NYSEDREGENTS_2010_4_4",
              "question": "A toy truck rolls over a smooth surface. If the surface is covered with sand, "
                          "the truck will most likely roll",
              "choices": {"text": ["slower", "faster", "at the same speed"], "label": ["A", "B", "C"]},
              "answerKey": "A"},
    }),
    "piqa": ("piqa/piqa.yaml", 1838, {
        0: {"goal": "How do I ready a guinea pig cage for it's new occupants?",
            "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                    "strips, you will also need to supply it with a water bottle and a food dish.",
            "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
                    "material, you will also need to supply it with a water bottle and a food dish.",
            "label": 0},
        1: {"goal": "dresser", "sol1": "replace drawer with bobby pin ",
            "sol2": "finish, woodgrain with  bobby pin ", "label": 1},
    }),
    "siqa": ("siqa/siqa.yaml", 1954, {
        0: {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
            "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"},
        1: {"context": "Sydney walked past a homeless woman asking for change but did not have any money they "
                       "could give to her. Sydney felt bad afterwards.",
            "question": "How would you describe Sydney?", "answerA": "sympathetic",
            "answerB": "like a person who was unable to help", "answerC": "incredulous", "label": "1"},
    }),
    "winogrande": ("winogrande/default.yaml", 1267, {
        0: {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "2"},
        1: {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "1"},
        2: {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ was't ruined.",
            "option1": "blanket", "option2": "bed", "answer": "2"},
    }),
    "lambada_openai": ("lambada/lambada_openai.yaml", 5153, {
        0: {"text": 'In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n'
                    '"Figured if you\'re going to be out at night getting hit by cars, you might as well have some '
                    'backup."\n\nI look at him, feeling stunned. Like this is some sort of sign. But as I stare at '
                    "Harlin, his mouth curved in a confident grin, I don't care about signs"},
        1: {"text": 'Give me a minute to change and I\'ll meet you at the docks." She\'d forced those words through '
                    'her teeth.\n\n"No need to change. We won\'t be that long."\n\nShane gripped her arm and started '
                    'leading her to the dock.\n\n"I can make it there on my own, Shane'},
    }),
    "boolq": ("super_glue/boolq/default.yaml", 3270, {
        8: {"question": "can u drive in canada with us license",
            "passage": "American entry into Canada by land -- Persons driving into Canada must have their vehicle's "
                       "registration document and proof of insurance.",
            "idx": 8, "label": 1},
        39: {"question": "is there a sequel to the movie the golden compass",
             "passage": "The Golden Compass (film) -- In 2011, Philip Pullman remarked at the British Humanist "
                        "Association annual conference that due to the first film's disappointing sales in the "
                        "United States, there would not be any sequels made.",
             "idx": 39, "label": 0},
    }),
    "openbookqa": ("openbookqa/openbookqa.yaml", 500, {
        0: {"id": "8-343",
            "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the "
                             "end of the year. After looking over their budget and expenses, they decide the best "
                             "way to save money is to",
            "choices": {"text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                                 "have lunch with friends"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B"},
        1: {"id": "1129", "question_stem": "There is most likely going to be fog around:",
            "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A"},
    }),
}

# Original rowanz/hellaswag release rows (label an int); the third is made up to exercise the WikiHow
# bracket clean-up of the standard preprocessing.
HELLASWAG_ORIGINAL = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "split": "val",
     "split_type": "zeroshot", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                 "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 7, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to clean a gutter [title] Set up a ladder. [step] Place it on firm ground.",
     "ctx_b": "", "ctx": "[header] How to clean a gutter [title] Set up a ladder. [step] Place it on firm ground.",
     "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["[substeps] Climb up  slowly.", "Jump.", "[title] Call a friend.", "Sing [step] loudly."],
     "source_id": "wikihow~1"},
]


def standard_task(rel: str, rows: list[dict]) -> ConfigurableTask:
    """lm-eval's installed standard task, its dataset replaced by ``rows`` in every split (no download)."""
    cfg = load_yaml(STANDARD / rel)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    data = datasets.Dataset.from_list(rows)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: data for s in ("train", "validation", "test")})
    return ConfigurableTask(config=cfg)


def requests(task: ConfigurableTask, doc: dict) -> tuple[list[tuple], object]:
    """The (context, continuation) pairs sent to the model for ``doc`` (zero-shot) and the gold index."""
    reqs = task.construct_requests(doc, task.fewshot_context(doc, num_fewshot=0), metadata=("t", 0, 1))
    args = [r.arguments for r in (reqs if isinstance(reqs, list) else [reqs])]
    gold = None
    if task.OUTPUT_TYPE == "multiple_choice":  # as in ConfigurableTask.process_results
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return args, gold


def assert_same_task(ours: ConfigurableTask, std: ConfigurableTask, pairs: list[tuple[dict, dict]]) -> None:
    assert ours.OUTPUT_TYPE == std.OUTPUT_TYPE
    assert ours.config.metric_list == std.config.metric_list
    assert ours.config.target_delimiter == std.config.target_delimiter
    for our_doc, std_doc in pairs:
        assert requests(ours, our_doc) == requests(std, std_doc)


@pytest.fixture(scope="module")
def local_tasks():
    tasks, skipped = load_tasks({}, LOCAL_TASKS)
    assert not skipped
    return tasks


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_local_docs_match_standard_task(local_tasks, name):
    rel, count, rows = HF_ROWS[name]
    ours, std = local_tasks[name], standard_task(rel, list(rows.values()))
    assert len(ours.eval_docs) == count
    assert_same_task(ours, std, [(ours.eval_docs[i], doc) for i, doc in zip(rows, std.eval_docs)])


def test_templates_are_the_standard_ones(local_tasks):
    """Beyond the sample rows: every prompt field except WinoGrande's is lm-eval's own."""
    for name in LOCAL_TASKS:
        if name == "winogrande":
            continue
        std = load_yaml(STANDARD / HF_ROWS[name][0])
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(local_tasks[name].config, key) == std.get(key), (name, key)
    assert {n: HEADLINE[n] == "acc_norm" for n in LOCAL_TASKS} == {
        n: any(m["metric"] == "acc_norm" for m in local_tasks[n].config.metric_list) for n in LOCAL_TASKS}


@pytest.fixture
def hellaswag_dir(tmp_path) -> Path:
    (tmp_path / "hellaswag").mkdir()
    with (tmp_path / "hellaswag" / "hellaswag_val.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in HELLASWAG_ORIGINAL)
    return tmp_path


def test_hellaswag_from_a_local_file_matches_standard(hellaswag_dir):
    tasks, skipped = load_tasks({"dir": str(hellaswag_dir)}, ["hellaswag"])
    assert not skipped
    ours = tasks["hellaswag"]
    std = standard_task("hellaswag/hellaswag.yaml", [{**r, "label": str(r["label"])} for r in HELLASWAG_ORIGINAL])
    assert len(ours.eval_docs) == 3
    # lm-eval's own preprocessing (its loader may import the module twice, so compare by source)
    assert inspect.getsourcefile(ours.config.process_docs) == inspect.getsourcefile(std.config.process_docs)
    assert ours.config.process_docs.__qualname__ == std.config.process_docs.__qualname__
    assert_same_task(ours, std, list(zip(ours.eval_docs, std.eval_docs)))
    assert requests(ours, ours.eval_docs[2])[0][1][1] == " Jump."


def test_hellaswag_without_data_is_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)  # even where a hub cache holds it
    shutil.copytree(SHARED_DATA / "arc", tmp_path / "arc")
    with caplog.at_level("WARNING", logger="pipeline.eval.zeroshot"):
        tasks, skipped = load_tasks({"dir": str(tmp_path)}, ["arc_easy", "hellaswag"])
    assert list(tasks) == ["arc_easy"] and skipped == ["hellaswag"]
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.eval.zeroshot"]
    assert len(lines) == 1 and "hellaswag" in lines[0] and "\n" not in lines[0]


@pytest.fixture(scope="module")
def tiny():
    return load_model(model_cfg("tiny_llama"))


def test_evaluate_zeroshot_end_to_end(tiny, hellaswag_dir):
    model, tok = tiny
    for name in ("arc", "winogrande", "lambada_openai"):
        shutil.copytree(SHARED_DATA / name, hellaswag_dir / name)
    tasks = ["arc_easy", "winogrande", "lambada_openai", "hellaswag"]
    out = evaluate_zeroshot(model, tok, {"dir": str(hellaswag_dir)}, tasks, limit=3, batch_size=4)
    assert out["zeroshot_limit"] == 3 and out["zeroshot_skipped"] == [] and out["zeroshot_tasks"] == tasks
    assert {"arc_easy_acc", "arc_easy_acc_norm", "hellaswag_acc_norm", "winogrande_acc",
            "lambada_openai_acc", "lambada_openai_perplexity"} <= out.keys()
    assert "winogrande_acc_norm" not in out
    for name in tasks:
        assert out[name] == out[f"{name}_{HEADLINE[name]}"]
        assert 0.0 <= out[name] <= 1.0 and out[name] * 3 == pytest.approx(round(out[name] * 3))
    assert out["zeroshot_avg"] == pytest.approx(sum(out[n] for n in tasks) / len(tasks))
    assert out["lambada_openai_perplexity"] > 1.0


def test_retied_embeddings_are_refused():
    """HFLM re-ties a model whose config still says tied: that would undo a rotated lm_head."""
    model, tok = load_model(model_cfg("tiny_llama"))
    model.lm_head.weight = type(model.lm_head.weight)(model.lm_head.weight.detach() * 2)
    with pytest.raises(PipelineError, match="re-tied"):
        evaluate_zeroshot(model, tok, {}, ["arc_easy"], limit=1)


@pytest.mark.parametrize("tasks, limit, match", [
    (["arc_easy", "mmlu"], 2, "unknown zero-shot task"),
    ([], 2, "unknown zero-shot task"),
    (["arc_easy"], 0, "positive integer"),
    (["arc_easy"], -3, "positive integer"),
    (["arc_easy"], 0.5, "positive integer"),
])
def test_bad_input_is_one_line(tiny, tasks, limit, match):
    with pytest.raises(PipelineError, match=match) as err:
        evaluate_zeroshot(*tiny, {}, tasks, limit=limit)
    assert "\n" not in str(err.value)


def test_missing_or_misaligned_files_are_one_line(tmp_path):
    with pytest.raises(PipelineError, match="piqa/valid.jsonl is missing") as err:
        load_tasks({"dir": str(tmp_path)}, ["piqa"])
    assert "\n" not in str(err.value)
    (tmp_path / "piqa").mkdir()
    lines = (SHARED_DATA / "piqa" / "valid.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "piqa" / "valid.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(PipelineError, match="2 labels for 3 items"):
        load_tasks({"dir": str(tmp_path)}, ["piqa"])
