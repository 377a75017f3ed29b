"""The bundled extractive QA data (examples/data/support_qa_*.jsonl) and the three-task example
recipe (examples/multitask_qa.toml): every record parses and maps to an exact answer span under the
built-in tokenizer, and the recipe trains and evaluates through the CLI.

The built-in model here is test-sized (tiny layers, 3 pre-training steps) but keeps the real spec's
vocab_size and tokenizer corpus, so its tokenizer is the built-in tokenizer itself (train_tokenizer
reads nothing else) and the recipe's max_length means what it means in the full run.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from peftcore.jobs import builtin
from peftcore.jobs.recipe import load_recipe
from peftcore.jobs.tasks import parse_records, qa_record, tokenize_records
from peftcore.models import load_tokenizer
from peftcore.multitask.model import HEADS_CONFIG, HEADS_WEIGHTS
from tests.peftcore.jobs.test_train import builtin_replaced_by, run

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
RECIPE = EXAMPLES / "multitask_qa.toml"
SMALL = dataclasses.replace(builtin.BuiltinSpec(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pretrain_steps=3, pretrain_batch_size=4,
                            pretrain_length=64)
FAST = ["--set", "train.batch_size=4", "--set", "train.eval_every=2", "--set", "eval.samples=1",
        "--set", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module", autouse=True)
def small_builtin(tmp_path_factory):
    with builtin_replaced_by(SMALL, tmp_path_factory.mktemp("cache")):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    assert SMALL.vocab_size == builtin.BuiltinSpec().vocab_size  # the built-in tokenizer, not a test one
    return load_tokenizer(builtin.ensure_builtin("tiny-llama"))


@pytest.fixture(scope="module")
def qa_files() -> dict[str, Path]:
    qa = load_recipe(RECIPE).tasks["qa"]
    assert qa.kind == "qa"
    return {"train": Path(qa.train), "eval": Path(qa.eval)}


def raw_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_japanese(text: str) -> bool:
    return any("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in text)


def test_every_record_parses_and_its_span_decodes_to_the_answer(tokenizer, qa_files):
    recipe = load_recipe(RECIPE)
    max_length = recipe.data.max_length
    for path in qa_files.values():
        records = parse_records(str(path), recipe.data.template, kind="qa")
        rows = tokenize_records(records, tokenizer, max_length, task="qa")  # raises on an answer past max_length
        for raw, row in zip(raw_records(path), rows, strict=True):
            start, end = row.span
            assert not row.truncated and end < max_length, row.where
            decoded = tokenizer.decode(row.input_ids[start : end + 1])
            assert raw["answer"] in decoded and decoded == raw["answer"], (row.where, decoded, raw["answer"])


def test_spans_use_the_tokens_of_the_whole_text(tokenizer, qa_files):
    """A row's ids are the whole text's (as a user's question over the context gets them at inference
    time), not the answer tokenized on its own, which would change the ids wherever a BPE merge
    crosses the answer's border and so mark the answer for the model to find."""
    for path in qa_files.values():
        records = parse_records(str(path), load_recipe(RECIPE).data.template, kind="qa")
        for raw, row in zip(raw_records(path), tokenize_records(records, tokenizer, 256), strict=True):
            whole = [tokenizer.bos_token_id, *tokenizer.encode(raw["question"] + "\n" + raw["context"],
                                                               add_special_tokens=False)]
            assert row.input_ids == whole, f"{row.where}: the answer's borders change the tokens"


def test_an_answer_inside_a_bpe_merge_takes_the_merged_tokens(tokenizer):
    """ " 4" is one token of the built-in vocabulary: the answer "4 hours" starts inside it, and its
    span starts at that token (the decoded span is the answer plus the leading space)."""
    context = "Restore points are created every 4 hours by default."
    assert len(tokenizer.encode(" 4", add_special_tokens=False)) == 1
    records = parse_records_from([{"context": context, "question": "How often?", "answer": "4 hours"}])
    row = tokenize_records(records, tokenizer, 256)[0]
    assert row.input_ids == [
        tokenizer.bos_token_id, *tokenizer.encode("How often?\n" + context, add_special_tokens=False)
    ]
    start, end = row.span
    assert tokenizer.decode(row.input_ids[start : end + 1]) == " 4 hours"


def parse_records_from(raw: list[dict]):
    return [qa_record(r, f"qa.jsonl:{i}") for i, r in enumerate(raw, start=1)]


def test_splits_are_bilingual_and_disjoint(qa_files):
    train, held_out = (raw_records(qa_files[split]) for split in ("train", "eval"))
    assert 150 <= len(train) <= 180 and len(held_out) == 40
    for records in (train, held_out):
        japanese = sum(is_japanese(r["question"]) for r in records)
        assert 0.4 <= japanese / len(records) <= 0.6
        assert all(is_japanese(r["question"]) == is_japanese(r["context"]) for r in records)
    pairs = {(r["context"], r["question"]) for r in train}
    assert not any((r["context"], r["question"]) in pairs for r in held_out)
    assert not {r["context"] for r in train} & {r["context"] for r in held_out}  # held-out passages too


def test_recipe_trains_three_tasks_and_eval_reports_exact_match(tmp_path):
    code, out, err = run("train", RECIPE, "--output-dir", tmp_path / "run", "--max-steps", 2, *FAST)
    assert code == 0, err
    assert "task qa (qa, weight 0.1, 40 eval records)" in out
    before = next(line for line in out.splitlines() if line.startswith("before: "))
    assert all(part in before for part in ("intent accuracy", "support perplexity", "qa exact match"))
    assert any(line.startswith("after:  ") and "qa exact match" in line for line in out.splitlines())
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", HEADS_WEIGHTS, HEADS_CONFIG} <= \
        {p.name for p in adapter.iterdir()}
    tasks = json.loads((adapter / HEADS_CONFIG).read_text())["tasks"]
    assert {name: spec["kind"] for name, spec in tasks.items()} == \
        {"intent": "classification", "support": "generation", "qa": "qa"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["after"]["eval_exact_match/qa"] >= 0

    code, out, err = run("eval", "--adapter", adapter, "--max-records", 1, "--output", tmp_path / "report.md")
    assert code == 0, err
    qa = json.loads((tmp_path / "report.json").read_text())["tasks"]["qa"]
    assert qa["kind"] == "qa" and qa["records"] == 40
    assert len(qa["metrics"]["exact match"]) == 2 and all(0 <= v <= 1 for v in qa["metrics"]["exact match"])
    assert "task qa (qa, 40 records)" in out and "exact match %" in out
    assert "## Task qa (qa)" in (tmp_path / "report.md").read_text()
    wrong = qa["samples"]  # two training steps: nearly every answer is still wrong; samples=1 keeps one
    assert qa["samples_title"] == "Answers the adapted model gets wrong" and len(wrong) == 1
    line = int(wrong[0]["where"].rpartition(":")[2])
    held_out = raw_records(EXAMPLES / "data" / "support_qa_eval.jsonl")[line - 1]
    assert (wrong[0]["prompt"], wrong[0]["reference"]) == (held_out["question"], held_out["answer"])
    assert "Answers the adapted model gets wrong" in (tmp_path / "report.md").read_text()
