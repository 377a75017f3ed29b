"""`peftcore eval --adapter DIR` on a multi-task adapter folder: one report section per task, the
numbers equal to peftcore.training.loop.evaluate on the MultiTaskModel loaded from the same files."""
import json
import shutil
from pathlib import Path

import pytest

from peftcore.analysis.text_metrics import bleu, repetition
from peftcore.jobs.bases import resolve_base
from peftcore.jobs.generate import generate_texts
from peftcore.jobs.recipe import load_recipe
from peftcore.jobs.tasks import pad_id
from peftcore.jobs.train import parse_task, tokenize_tasks
from peftcore.models import load_pretrained, load_tokenizer
from peftcore.multitask.model import MultiTaskModel
from peftcore.training.loop import evaluate
from tests.peftcore.jobs.test_train import run, tiny_builtin  # noqa: F401  (the autouse fixture: a tiny built-in model)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SETTINGS = ["--set", "data.max_length=96", "--set", "train.batch_size=4", "--set", "train.eval_every=0",
            "--set", "eval.samples=2", "--set", "eval.max_new_tokens=6"]
GENERATED = 3  # --max-records: the support records generated for BLEU / chrF


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multitask")
    code, _, err = run("train", EXAMPLES / "multitask.toml", "--output-dir", folder, "--max-steps", 2, *SETTINGS)
    assert code == 0, err
    return folder / "adapter"


@pytest.fixture(scope="module")
def evaluated(adapter, tmp_path_factory) -> tuple[str, dict, str]:
    report = tmp_path_factory.mktemp("report") / "report.md"
    code, out, err = run("eval", "--adapter", adapter, "--max-records", GENERATED, "--glossary",
                         EXAMPLES / "data" / "glossary.txt", "--output", report)
    assert code == 0, err
    return report.read_text(), json.loads(report.with_suffix(".json").read_text()), out


def direct_scores(adapter: Path) -> tuple[MultiTaskModel, object, dict, dict, dict]:
    """The oracle: the training job's own data path and evaluate() on MultiTaskModel.from_pretrained."""
    recipe = load_recipe(EXAMPLES / "multitask.toml", SETTINGS[1::2])
    tasks = {name: parse_task(name, task, recipe) for name, task in recipe.tasks.items()}
    tokenizer = load_tokenizer(adapter)
    _, eval_rows = tokenize_tasks(tasks, tokenizer, recipe.data.max_length, None)
    model = MultiTaskModel.from_pretrained(
        load_pretrained(resolve_base("builtin:tiny-llama")), adapter
    )
    with model.backbone.disable_adapter():
        base = evaluate(model, eval_rows, 8, pad_id(tokenizer), task_weights=model.task_weights)
    adapted = evaluate(model, eval_rows, 8, pad_id(tokenizer), task_weights=model.task_weights)
    return model, tokenizer, tasks, base, adapted


def test_report_has_a_section_per_task_with_its_metrics(evaluated):
    markdown, result, out = evaluated
    assert set(result["tasks"]) == {"intent", "support"}
    intent, support = markdown.split("## Task intent (classification)")[1].split("## Task support (generation)")
    for row in ("| accuracy % |", "| loss |"):
        assert row in intent and row not in support
    for row in ("| perplexity |", "| BLEU (13a) |", "| chrF |", "| glossary adherence % |", "| repeated 3-grams % |",
                "| phrase loops % |", "| distinct-2 % |"):
        assert row in support and row not in intent
    assert "Data `" in intent and "(48 records)" in intent
    assert f"(40 records, {GENERATED} generated greedily)" in support and "### Sample generations" in support
    assert "trained heads" in markdown.split("## Task")[0]  # the base column's meaning is stated
    assert "task intent (classification" in out and "task support (generation" in out


def test_numbers_equal_evaluate_on_the_loaded_multitask_model(adapter, evaluated):
    markdown, result, _ = evaluated
    model, tokenizer, tasks, base, adapted = direct_scores(adapter)
    intent, support = result["tasks"]["intent"]["metrics"], result["tasks"]["support"]["metrics"]
    assert intent["accuracy"] == pytest.approx([base["eval_accuracy/intent"], adapted["eval_accuracy/intent"]],
                                               abs=1e-12)
    assert intent["loss"] == pytest.approx([base["eval_loss/intent"], adapted["eval_loss/intent"]], rel=1e-6)
    assert support["perplexity"] == pytest.approx([base["eval_ppl/support"], adapted["eval_ppl/support"]], rel=1e-6)
    assert result["weighted_loss"] == pytest.approx([base["eval_loss"], adapted["eval_loss"]], rel=1e-6)
    assert base["eval_loss/support"] != pytest.approx(adapted["eval_loss/support"], rel=1e-6)  # the adapter did move
    acc = [100 * base["eval_accuracy/intent"], 100 * adapted["eval_accuracy/intent"]]
    assert f"| accuracy % | {acc[0]:.2f} | {acc[1]:.2f} | {acc[1] - acc[0]:+.2f} |" in markdown
    # generation: greedy outputs of the shared adapter + LM head, scored as the single-task eval scores them
    records = tasks["support"].eval_records[:GENERATED]
    settings = type("S", (), {"temperature": 0.0, "top_k": None, "top_p": None, "max_new_tokens": 6, "batch_size": 8})
    adapted_out = generate_texts(model.backbone, tokenizer, [r.prompt for r in records], settings)
    with model.backbone.disable_adapter():
        base_out = generate_texts(model.backbone, tokenizer, [r.prompt for r in records], settings)
    references = [r.reference for r in records]
    assert support["BLEU (13a)"] == pytest.approx(
        [bleu(base_out, references).score, bleu(adapted_out, references).score]
    )
    assert support["distinct-2 %"][1] == pytest.approx(100 * repetition(adapted_out)["distinct_2"])
    samples = result["tasks"]["support"]["samples"]
    assert [s["adapted"] for s in samples] == adapted_out[: len(samples)]


def test_misclassified_samples_name_the_classes(evaluated):
    _, result, _ = evaluated
    labels = json.loads((EXAMPLES / "data" / "intent_labels.json").read_text())["labels"]
    for sample in result["tasks"]["intent"]["samples"]:
        assert sample["adapted"] != sample["reference"] and {sample["adapted"], sample["reference"]} <= set(labels)


def test_data_flag_and_missing_eval_data_are_one_line_errors(adapter, tmp_path):
    code, _, err = run("eval", "--adapter", adapter, "--data", EXAMPLES / "data" / "support_eval.jsonl")
    assert code == 2 and "each task's eval data" in err and len(err.strip().splitlines()) == 1
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    recipe = json.loads((copy / "peftcore_recipe.json").read_text())
    for task in recipe["tasks"].values():
        task["eval"] = None
    (copy / "peftcore_recipe.json").write_text(json.dumps(recipe))
    code, _, err = run("eval", "--adapter", copy)
    assert code == 2 and "no evaluation data: none of the recipe's tasks (intent, support)" in err


def test_qa_tasks_report_exact_match():
    """A qa head's eval: exact match next to its loss (the report helper, no model needed)."""
    from peftcore.jobs.eval import multitask_report, text_table

    task = {"kind": "qa", "data": "qa.jsonl", "records": 4, "metrics": {"exact match": [0.25, 0.5], "loss": [3.0, 2.0]}}
    assert "exact match %" in text_table(task) and "50.00" in text_table(task)
    markdown = multitask_report({"adapter": "a", "base": "b", "weighted_loss": [3.0, 2.0], "tasks": {"span": task}})
    assert "## Task span (qa)" in markdown and "| exact match % | 25.00 | 50.00 | +25.00 |" in markdown
