"""A job's data per task (causal LM or sequence classification; a multi-task job's generation /
classification / qa tasks): records read and checked before any model loads, then tokenized into
rows, with the failures a user can fix named at their file:line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftcore import _json
from peftcore.data.augment import AugmentConfig, augment_records
from peftcore.data.records import (
    IGNORE_INDEX,
    DataError,
    Example,
    PromptTemplate,
    TokenizedExample,
    qa_example,
    read_records,
    to_example,
    tokenize_span,
)
from peftcore.data.records import tokenize as tokenize_example
from peftcore.jobs.bases import TaskError
from peftcore.multitask.heads import Classification, Generation, QuestionAnswering


@dataclass
class Record:
    """One record, parsed: what the model sees, what it should say, and what a person reads."""

    where: str
    example: Example  # segments (classification: text, then the label as the "response")
    shown: str  # the question as the user wrote it
    label: int | None = None
    span: bool = False  # extractive QA: the trained segment is the answer inside the context
    # The fields the user wrote that must say something (input and output; chat: each user and
    # assistant turn): the data report flags blank ones, which the rendered prompt would hide.
    texts: tuple[str, ...] = ()
    # The answer as the user wrote it: the trained segment may carry what a chat template adds around
    # it (SmolLM2: "<|im_end|>\n"), which no reference for BLEU / chrF or a person should hold.
    answer: str | None = None
    instruction: str | None = None  # the record's instruction (chat: its system turn), if it has one

    @property
    def prompt(self) -> str:
        """Everything before the first trained segment: what generation starts from."""
        out = []
        for text, trained in self.example.segments:
            if trained:
                break
            out.append(text)
        return "".join(out)

    @property
    def reference(self) -> str:
        if self.answer is not None:
            return self.answer.strip()
        return next((text for text, trained in self.example.segments if trained), "").strip()


def read_json(path: Path):
    """A JSON file someone else may have written (a label list): errors at its file:line[:column]."""
    return _json.read_json(path, TaskError)


def read_json_object(path: Path) -> dict:
    return _json.read_json_object(path, TaskError)


def read_labels(path: str | None) -> list[str]:
    if not path:
        raise TaskError("task SEQ_CLS needs [data] labels = \"labels.json\" ({\"labels\": [...]} or a JSON list)")
    data = read_json(Path(path))
    labels = data.get("labels") if isinstance(data, dict) else data
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise TaskError(f"{Path(path).name}: expected {{\"labels\": [\"name\", ...]}} (a non-empty list of strings)")
    return labels


def parse_records(path: str, template: PromptTemplate, labels: list[str] | None = None,
                  augment: AugmentConfig | None = None, kind: str | None = None) -> list[Record]:
    """Read and check every record (no tokenizer needed, so bad data fails before any model loads).

    `kind`: a head kind's name (peftcore.multitask.heads; default: classification when labels are given)."""
    kind = kind or (Classification.name if labels is not None else Generation.name)
    raw = read_records(path)
    parse = {Classification.name: lambda r, where: classification_record(r, where, labels),
             QuestionAnswering.name: qa_record,
             Generation.name: lambda r, where: causal_record(r, where, template)}[kind]
    # Every record is checked as the user wrote it before any is perturbed: a bad record then fails
    # with its file:line whether augmentation is on or not, not somewhere inside the perturbing.
    records = [parse(r, where) for r, where in raw]
    if not records:
        raise DataError(f"{Path(path).name}: no records: the dataset is empty")
    # QA records are not perturbed: perturbed contexts would lose their answers
    if augment is not None and augment.copies and kind != QuestionAnswering.name:
        copies = augment_records(raw, augment, kind)[len(raw):]
        records += [parse(r, where) for r, where in copies]
    return records


def causal_record(record, where: str, template: PromptTemplate) -> Record:
    example = to_example(record, where, template)
    if "messages" in record:
        shown = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
        texts = tuple(m["content"] for m in record["messages"] if m["role"] in ("user", "assistant"))
        answer = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
        instruction = next((m["content"] for m in record["messages"] if m["role"] == "system"), None)
    else:
        shown, texts, answer = record["input"], (record["input"], record["output"]), record["output"]
        instruction = record.get("instruction") or None
    return Record(where, example, shown, texts=texts, answer=answer, instruction=instruction)


def classification_record(record, where: str, labels: list[str]) -> Record:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "label" not in record:
        raise DataError(f"{where}: a classification record needs a string \"text\" and a \"label\"")
    label = record["label"]
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        index = label
    elif label in labels:
        index = labels.index(label)
    else:
        raise DataError(f"{where}: label {label!r} is not one of {', '.join(labels)}")
    return Record(where, Example(where, [(record["text"], False), (labels[index], True)]), record["text"], index,
                  texts=(record["text"],))


def qa_record(record, where: str) -> Record:
    example = qa_example(record, where)
    return Record(where, example, record["question"], span=True,
                  texts=(record["question"], record["context"], record["answer"]))


def tokenize_records(records: list[Record], tokenizer, max_length: int,
                     task: str | None = None) -> list[TokenizedExample]:
    """`task`: the multi-task job's task name, stamped on every row (it routes the row's batch to its head)."""
    rows = []
    for r in records:
        if r.span:
            row = tokenize_span(r.example, tokenizer, max_length)
        elif r.label is None:
            row = tokenize_example(r.example, tokenizer, max_length)
        else:
            ids = tokenizer.encode(r.shown)  # with the encoder's own [CLS] ... [SEP]
            row = TokenizedExample(r.where, ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length),
                                   truncated=len(ids) > max_length, label=r.label)
        row.task = task
        rows.append(row)
    refuse_untrainable(records, rows, tokenizer, max_length)
    return rows


def refuse_untrainable(records: list[Record], rows: list[TokenizedExample], tokenizer, max_length: int) -> None:
    """A max_length that cuts every generation row before its output leaves no token to train: the
    loss would be empty and a run would "finish" having learned nothing. A few cut rows are only
    reported (the data report's truncated count)."""
    generation = [(r, row) for r, row in zip(records, rows) if row.kind == Generation.name]
    if not generation or any(lab != IGNORE_INDEX for _, row in generation for lab in row.labels):
        return
    shortest = min(prompt_tokens(r.example, tokenizer) for r, _ in generation)
    source = records[0].where.rsplit(":", 1)[0]
    raise DataError(f"{source}: all {len(generation)} records are cut at max_length {max_length} before their output: "
                    f"no token would train; raise [data] max_length to at least {shortest + 1} "
                    "(the shortest prompt + 1)")


def prompt_tokens(example: Example, tokenizer) -> int:
    """The tokens before the first trained one, BOS included, untruncated."""
    labels = tokenize_example(example, tokenizer, 10**9).labels
    return next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0

