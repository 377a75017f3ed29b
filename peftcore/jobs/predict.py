"""`peftcore predict`: what a classification or extractive-QA adapter says about new inputs, given on
the command line (one line per input) or as the records of a JSONL / JSON file (one JSON line each).

Inputs are tokenized as training tokenized the task's records (peftcore.jobs.tasks.tokenize_records):
a classification text between the tokenizer's own special tokens ([CLS] ... [SEP], a Llama's BOS), a
qa record as "question\\ncontext" between them, both cut at the recipe's max_length. The recipe's
prompt template is not applied: training applies it to generation records only.

A qa answer is the best span among the context's tokens only (as transformers' question-answering
pipeline), so it is always a piece of the context; its score is P(first token) x P(last token) under
the start / end softmaxes over those tokens. `peftcore eval` decodes over the whole row and counts
token spans, so its exact match can differ from the one printed here (the answer's text equal to the
record's, ends stripped).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcore._json import json_safe
from peftcore._logging import quiet
from peftcore.data.records import IGNORE_INDEX, DataError, TokenizedExample, read_records, special_tokens_around
from peftcore.jobs.adapter_folder import Loaded, load_adapter_folder, read_adapter_info
from peftcore.jobs.bases import TaskError
from peftcore.jobs.eval import batched_logits, class_names
from peftcore.jobs.generate import one_line
from peftcore.jobs.tasks import classification_record, pad_id
from peftcore.multitask.heads import Classification, Generation, HeadKind, QuestionAnswering, best_spans
from peftcore.multitask.model import HEADS_CONFIG, read_task_specs

log = logging.getLogger(__name__)


@dataclass
class Target:
    """The head predictions come from: a task of a multi-task folder, or (name None) a single-task classifier."""

    name: str | None
    head: HeadKind
    labels: list[str] | None  # classification: class names in the head's order (None: read off the logits)

    @property
    def route(self) -> dict:
        return {} if self.name is None else {"task": self.name}


@dataclass
class Query:
    """One input: the record as given (the JSONL output repeats it) and its gold answer, if it has one."""

    where: str
    record: dict
    gold: str | None = None  # classification: the class name; qa: the answer's text (ends stripped)


def run_predict(adapter, inputs=(), data: str | None = None, output: Path | None = None, *, task: str | None = None,
                context: str | None = None, top_k: int = 3, batch_size: int = 16,
                base: str | None = None) -> list[dict]:
    """Predictions for `inputs` (texts; qa: questions over `context`) or the records of `data`: printed one
    line per input, or JSONL to `output` (None: stdout) with the accuracy / exact match of the records
    that carry a label / answer. Task and inputs are checked before the model loads."""
    adapter = Path(adapter)
    check_arguments(inputs, data, output, top_k, batch_size)
    target = pick_target(adapter, task)
    queries = read_queries(data, target) if data else command_line_queries(inputs, context, target)
    with quiet():  # stdout carries the predictions
        loaded = load_adapter_folder(adapter, base)
    progress = "predict" if data and output else None
    predictions = list(predict_queries(loaded, target, queries, top_k, batch_size, progress))
    if not data:
        for query, prediction in zip(queries, predictions):
            text = query.record.get("text", query.record.get("question"))
            print(describe(prediction) if len(queries) == 1 else f"{one_line(text, 60)} -> {describe(prediction)}")
        return predictions
    write_jsonl(queries, predictions, output)
    note = score_line(target, queries, predictions)
    if output is not None:
        log.info(f"{len(predictions)} predictions written to {output}" + (f"; {note}" if note else ""))
    elif note:  # stdout holds the JSONL alone
        print(note, file=sys.stderr)
    return predictions


def check_arguments(inputs, data, output, top_k: int, batch_size: int) -> None:
    if bool(inputs) == bool(data):
        raise TaskError("give the inputs to predict as arguments, or --data FILE.jsonl (one record a line), not "
                        + ("both" if inputs else "neither"))
    if output is not None and not data:
        raise TaskError("--output writes the predictions for --data FILE; inputs given as arguments are printed")
    if output is not None and Path(output).resolve() == Path(data).resolve():
        raise TaskError(f"--output {output} is the --data file itself; write the predictions elsewhere")
    if top_k < 1 or batch_size < 1:
        raise TaskError(f"--{'top-k' if top_k < 1 else 'batch-size'} must be at least 1")


# -- which head ---------------------------------------------------------------------------------
def pick_target(adapter: Path, task: str | None) -> Target:
    """--task among a multi-task folder's heads (none given: its one classification / qa task); a
    single-task folder predicts only if it is a classifier."""
    _, info = read_adapter_info(adapter)
    if not (adapter / HEADS_CONFIG).is_file():
        if task is not None:
            raise TaskError(f"--task {task}: {adapter} is a single-task adapter; leave --task out")
        if info["model"]["task"] != "SEQ_CLS":
            raise TaskError(f"{adapter} is a generation adapter (no classification or qa head): "
                            f"use peftcore generate --adapter {adapter} \"prompt\"")
        return Target(None, Classification, info.get("labels"))
    specs = read_task_specs(adapter)
    listed = ", ".join(f"{name} ({spec.kind})" for name, spec in specs.items())
    if task is None:
        heads = [name for name, spec in specs.items() if spec.head is not Generation]
        if len(heads) != 1:
            raise TaskError(f"{adapter} has tasks {listed}: pass --task NAME"
                            + (f" (one of {', '.join(heads)})" if heads else
                               "; generation tasks answer through peftcore generate"))
        task = heads[0]
    if task not in specs:
        raise TaskError(f"--task {task}: {adapter} has no such task; its tasks: {listed}")
    spec = specs[task]
    if spec.head is Generation:
        raise TaskError(f"task {task} is a generation task: use peftcore generate --adapter {adapter} \"prompt\"")
    return Target(task, spec.head, class_names(spec) if spec.head is Classification else None)


# -- inputs -------------------------------------------------------------------------------------
def command_line_queries(inputs, context: str | None, target: Target) -> list[Query]:
    if target.head is Classification:
        if context is not None:
            raise TaskError("--context is for qa tasks; a classification task reads the input text alone")
        return [Query(f"input {i}", {"text": text}) for i, text in enumerate(inputs, start=1)]
    if not context or not context.strip():
        raise TaskError("a qa task answers from a passage: pass --context TEXT (the inputs are the questions)")
    return [Query(f"input {i}", {"question": question, "context": context}) for i, question in enumerate(inputs, 1)]


def read_queries(data: str, target: Target) -> list[Query]:
    """The file's records, checked as training checks the task's records: a bad one names its file:line."""
    records = read_records(data)
    if not records:
        raise DataError(f"{Path(data).name}: no records: the file is empty")
    parse = classification_query if target.head is Classification else qa_query
    return [parse(record, where, target) for record, where in records]


def classification_query(record, where: str, target: Target) -> Query:
    if isinstance(record, dict) and "label" in record and target.labels is not None:
        return Query(where, record, target.labels[classification_record(record, where, target.labels).label])
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{where}: a classification record needs a string \"text\" (and, to be scored, a \"label\")")
    label = record.get("label")  # a classifier without class names (a foreign adapter) is scored by class id
    return Query(where, record, str(label) if isinstance(label, int) and not isinstance(label, bool) else None)


def qa_query(record, where: str, target: Target) -> Query:
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "context")):
        raise DataError(f"{where}: a qa record needs string fields \"question\" and \"context\" "
                        "(and, to be scored, an \"answer\")")
    if not record["context"].strip():
        raise DataError(f"{where}: the context is empty: there is nothing to answer from")
    if "answer" in record and not isinstance(record["answer"], str):
        raise DataError(f"{where}: field 'answer' must be a string, got {type(record['answer']).__name__}")
    return Query(where, record, record["answer"].strip() if "answer" in record else None)


# -- predicting ---------------------------------------------------------------------------------
def predict_queries(loaded: Loaded, target: Target, queries: list[Query], top_k: int, batch_size: int,
                    progress: str | None = None):
    """One prediction dict per query, in order, from forwards of `batch_size` rows."""
    from tqdm.auto import tqdm

    tokenizer, max_length = loaded.tokenizer, loaded.info["data"].get("max_length", 512)
    qa = target.head is QuestionAnswering
    rows = [qa_row(q, tokenizer, max_length) if qa else classification_row(q, tokenizer, max_length) for q in queries]
    outputs = batched_logits(loaded.model, [row for row, _ in rows], batch_size, pad_id(tokenizer), **target.route)
    batches = tqdm(outputs, desc=progress, total=math.ceil(len(rows) / batch_size), unit="batch",
                   disable=progress is None, dynamic_ncols=True)
    for i, logits in enumerate(batches):  # (zip would stop the bar before its last step)
        chunk = rows[i * batch_size : (i + 1) * batch_size]
        found = answers(*logits, chunk) if qa else classes(logits, target, top_k)
        for (row, _), prediction in zip(chunk, found):
            yield {**prediction, **({"truncated": True} if row.truncated else {})}


def classification_row(query: Query, tokenizer, max_length: int) -> tuple[TokenizedExample, None]:
    """As tokenize_records makes a classification row: the text between the tokenizer's own special tokens."""
    ids = tokenizer.encode(query.record["text"])
    return TokenizedExample(query.where, ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length),
                            truncated=len(ids) > max_length), None


def classes(logits: torch.Tensor, target: Target, top_k: int) -> list[dict]:
    names = target.labels or [str(i) for i in range(logits.shape[-1])]
    values, indices = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    out = []
    for probs, ids in zip(values.tolist(), indices.tolist()):
        ranked = [{"label": names[i], "probability": round(p, 6)} for p, i in zip(probs, ids)]
        out.append({"label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked})
    return out


def qa_row(query: Query, tokenizer, max_length: int) -> tuple[TokenizedExample, tuple[str, list]]:
    """As tokenize_span makes a qa row (the whole text tokenized at once), with each position's
    (start, end) characters in the context: None for the special tokens and the question's tokens."""
    question, context = query.record["question"], query.record["context"]
    ids, offsets = tokenizer.encode_with_offsets(question + "\n" + context, add_special_tokens=False)
    begin = len(question) + 1
    lead, tail = special_tokens_around(tokenizer)
    chars = [None] * len(lead) + [(max(lo, begin) - begin, hi - begin) if hi > max(lo, begin) else None
                                  for lo, hi in offsets] + [None] * len(tail)
    ids = lead + ids + tail
    row = TokenizedExample(query.where, ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length),
                           truncated=len(ids) > max_length)
    chars = chars[:max_length]
    if not any(chars):
        raise DataError(f"{query.where}: the question fills max_length {max_length}: no context token is left "
                        "to answer from")
    return row, (context, chars)


def answers(start: torch.Tensor, end: torch.Tensor, chunk: list) -> list[dict]:
    """The best span of context tokens per row, as the context's text (ends stripped) and character range."""
    allowed = torch.zeros(start.shape, dtype=torch.bool, device=start.device)
    for b, (_, (_, chars)) in enumerate(chunk):
        allowed[b, [i for i, c in enumerate(chars) if c]] = True
    start = start.float().masked_fill(~allowed, -math.inf)
    end = end.float().masked_fill(~allowed, -math.inf)
    spans = best_spans(start, end)  # (B, 2)
    scores = start.softmax(-1).gather(1, spans[:, :1]) * end.softmax(-1).gather(1, spans[:, 1:])
    out = []
    for (_, (context, chars)), (first, last), score in zip(chunk, spans.tolist(), scores[:, 0].tolist()):
        lo, hi = chars[first][0], chars[last][1]
        text = context[lo:hi]
        lo += len(text) - len(text.lstrip())
        out.append({"answer": text.strip(), "score": round(score, 6), "start": lo, "end": lo + len(text.strip())})
    return out


# -- output -------------------------------------------------------------------------------------
def describe(prediction: dict) -> str:
    """One prediction as a line: `billing 0.912 (restore 0.041, login 0.020)` / `90 days (score 0.412)`."""
    if "answer" in prediction:
        return f"{prediction['answer']} (score {prediction['score']:.3f})"
    others = ", ".join(f"{c['label']} {c['probability']:.3f}" for c in prediction["top_k"][1:])
    return f"{prediction['label']} {prediction['probability']:.3f}" + (f" ({others})" if others else "")


def write_jsonl(queries: list[Query], predictions: list[dict], output: Path | None) -> None:
    """Each record as given, plus "prediction" (and "correct" where it had a gold label / answer)."""
    lines = []
    for query, prediction in zip(queries, predictions):
        if query.gold is not None:
            prediction = {**prediction, "correct": is_correct(query, prediction)}
        line = json_safe({**query.record, "prediction": prediction})  # a NaN logit: null, not invalid JSON
        lines.append(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
    if output is None:
        sys.stdout.writelines(lines)
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text("".join(lines), encoding="utf-8")


def is_correct(query: Query, prediction: dict) -> bool:
    return prediction.get("answer", prediction.get("label")) == query.gold


def score_line(target: Target, queries: list[Query], predictions: list[dict]) -> str | None:
    """Accuracy / exact match over the records that carry a label / answer (None: no record does)."""
    scored = [is_correct(q, p) for q, p in zip(queries, predictions) if q.gold is not None]
    if not scored:
        return None
    what = "accuracy" if target.head is Classification else "exact match"
    having = "a label" if target.head is Classification else "an answer"
    return f"{what} {100 * sum(scored) / len(scored):.1f}% ({sum(scored)} of {len(scored)} records with {having})"
