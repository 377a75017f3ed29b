"""Training data: records from JSONL / JSON, prompt templates, loss masks, truncation, packing.

Records are `{"input", "output"}` (optionally `"instruction"`) or chat `{"messages": [{"role",
"content"}, ...]}`. The loss covers only what the model should learn to write (the output, or the
assistant turns): every other label is -100. Extractive QA records `{"context", "question",
"answer"}` become the answer's token span in the context. Every bad record is an error naming `file:line`.

Rows of a multi-task job carry their task's name (`TokenizedExample.task`); a batch holds rows of
one task and `collate` adds "task" and "kind" (generation / classification / qa) to it.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from peftcore._json import read_text
from peftcore.models.fused import IGNORE_INDEX  # noqa: F401  re-exported: data code reads it from here

DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
DEFAULT_TEMPLATE_NO_INSTRUCTION = "### Input:\n{input}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A record that cannot be trained on; the message starts with file:line."""


@dataclass
class Example:
    where: str  # "file:line", for every message about this record
    segments: list[tuple[str, bool]]  # (text, trained?) in order; trained segments carry the loss
    # A chat template closes each turn itself (SmolLM2: "...<|im_end|>\n"): no EOS is appended then,
    # which would train "<|im_end|>\n<|im_end|>", a turn end the model never sees at inference.
    ends_turn: bool = False

    @property
    def prompt(self) -> str:
        return "".join(text for text, trained in self.segments if not trained)

    @property
    def response(self) -> str:
        return "".join(text for text, trained in self.segments if trained)


@dataclass
class TokenizedExample:
    where: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    label: int | None = None  # sequence classification: the class index (then `labels` is unused)
    span: tuple[int, int] | None = None  # extractive QA: the answer's first and last token (then `labels` is unused)
    task: str | None = None  # multi-task rows: the task (and head) this row trains

    @property
    def kind(self) -> str:
        if self.label is not None:
            return "classification"
        return "qa" if self.span is not None else "generation"


@dataclass
class PromptTemplate:
    """`{instruction}` / `{input}` placeholders; the response follows the rendered prompt directly."""

    with_instruction: str = DEFAULT_TEMPLATE  # the prompt of a record with an instruction
    without_instruction: str = DEFAULT_TEMPLATE_NO_INSTRUCTION  # the prompt of a record without one
    chat_template: str | None = None  # a jinja chat template (a checkpoint's own) for chat records
    # role -> the header before its turn, for chat records without a chat_template
    chat_roles: dict = field(
        default_factory=lambda: {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"})
    # With a chat_template, input/output records become a (system,) user, assistant exchange in it: an
    # instruct model trained on "### Response:" would leak that header into its answers. False: keep them
    # in with_instruction / without_instruction.
    io_as_chat: bool = True

    def render(self, record: dict) -> str:
        template = self.with_instruction if record.get("instruction") else self.without_instruction
        return template.format(instruction=record.get("instruction", ""), input=record["input"])


# -- reading ------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[dict, str]]:
    """-> [(record, "file:line")]. JSONL: one object per line; JSON: an array of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = read_text(path, path.name, error=DataError)
    if path.suffix == ".json":
        return read_json_array(text, path.name)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"{path.name}:{lineno}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return records


def read_json_array(text: str, name: str) -> list[tuple[dict, str]]:
    """Decode the array element by element so each record knows the line it starts on."""
    decoder = json.JSONDecoder()
    pos = skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{name}:{text.count(chr(10), 0, pos) + 1}: a .json data file must hold an array of records")
    pos, records = skip_space(text, pos + 1), []
    while not text.startswith("]", pos):
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: not valid JSON ({e.msg})") from None
        records.append((record, f"{name}:{line}"))
        pos = skip_space(text, pos)
        if text.startswith(",", pos):
            pos = skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{name}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' between records")
    return records


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# -- records -> examples ------------------------------------------------------------------------
def to_example(record, where: str, template: PromptTemplate) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return chat_example(record["messages"], where, template)
    missing = [k for k in ("input", "output") if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (expected input/output or messages)")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    if template.chat_template and template.io_as_chat:
        return chat_example(io_messages(record), where, template)
    return Example(where, [(template.render(record), False), (record["output"], True)])


def io_messages(record: dict) -> list[dict]:
    """An input/output record as a conversation: the instruction (if any) as the system turn."""
    system = [{"role": "system", "content": record["instruction"]}] if record.get("instruction") else []
    return system + [{"role": "user", "content": record["input"]}, {"role": "assistant", "content": record["output"]}]


def chat_example(messages, where: str, template: PromptTemplate) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: nothing to learn from")
    if template.chat_template:
        return Example(where, jinja_segments(messages, template.chat_template, where), ends_turn=True)
    segments = []
    for m in messages:
        header = template.chat_roles[m["role"]]
        trained = m["role"] == "assistant"
        segments += ([(header, False), (m["content"] + "\n", trained)] if trained
                     else [(header + m["content"] + "\n", False)])
    return Example(where, segments)


def jinja_segments(messages: list[dict], chat_template: str, where: str = "chat") -> list[tuple[str, bool]]:
    """Render growing prefixes of the conversation; each message's segment is the new text it adds,
    and an assistant turn's header (what add_generation_prompt adds) stays untrained.

    A template that re-renders earlier turns (some drop past reasoning) cannot be split turn by turn:
    then only the last assistant turn trains, after everything before it as the prompt."""
    render = compile_chat_template(chat_template, where)
    segments, previous = [], ""
    for i, m in enumerate(messages):
        rendered = render(messages[: i + 1])
        if m["role"] == "assistant" and i > 0:
            header = render(messages[:i], add_generation_prompt=True)
            if header.startswith(previous) and rendered.startswith(header):
                segments.append((header[len(previous):], False))
                previous = header
        if not rendered.startswith(previous):
            return last_turn_segments(messages, render, where)
        segments.append((rendered[len(previous):], m["role"] == "assistant"))
        previous = rendered
    return [(text, trained) for text, trained in segments if text]


def chat_prompt(messages: list[dict], template: PromptTemplate) -> str:
    """The text a chat-trained model continues: the conversation so far plus the assistant's header."""
    if template.chat_template:
        return compile_chat_template(template.chat_template, "prompt")(messages, add_generation_prompt=True)
    return ("".join(template.chat_roles[m["role"]] + m["content"] + "\n" for m in messages)
            + template.chat_roles["assistant"])


def last_turn_segments(messages: list[dict], render, where: str) -> list[tuple[str, bool]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, whole = render(messages[:last], add_generation_prompt=True), render(messages[: last + 1])
    if not whole.startswith(prompt):
        raise DataError(f"{where}: the chat template renders the conversation so that no assistant turn is a "
                        "suffix of its prompt: set [data.template] chat_template to one that appends turns")
    return [(prompt, False), (whole[len(prompt):], True)]


def compile_chat_template(chat_template: str, where: str):
    """-> render(messages, add_generation_prompt=False) -> str. Checkpoints' templates call
    raise_exception(...) on conversations they refuse (roles out of order, a system turn where none
    is allowed): that, and any other template error, becomes a one-line DataError naming the record.

    A template is code from whoever made the checkpoint or recipe: it runs in jinja's immutable
    sandbox, with the helpers transformers gives templates, so a template that reaches for Python's
    internals (a module's globals, the class list) fails here instead of running."""
    import jinja2

    if tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise DataError(f"{where}: jinja2 {jinja2.__version__}'s sandbox has published escapes (CVE-2025-27516) "
                        "and chat templates are untrusted code: pip install 'jinja2>=3.1.6'")
    try:
        template = sandboxed_template(chat_template)
    except jinja2.TemplateError as e:
        line = f" (its line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DataError(f"{where}: the chat template does not parse{line}: {one_line(e)}") from None

    def render(turns: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return template.render(messages=turns, add_generation_prompt=add_generation_prompt, bos_token="",
                                   eos_token="")
        except TemplateRefusal as e:
            raise DataError(f"{where}: the chat template refuses this conversation: {one_line(e)}") from None
        except jinja2.exceptions.SecurityError as e:
            raise DataError(f"{where}: the chat template was stopped by the sandbox ({one_line(e).rstrip('.')}): "
                            "a chat template may only format the messages; use another one") from None
        except Exception as e:  # noqa: BLE001  foreign code: whatever it raises is the template's fault
            raise DataError(f"{where}: the chat template failed on this conversation: {one_line(e)}") from None

    return render


class TemplateRefusal(Exception):
    """raise_exception(...) called by a chat template: its verdict on the conversation, not a bug."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (a template's or a decoder's may span several): how the CLI prints errors."""
    return " ".join(str(error).split()) or type(error).__name__


@functools.lru_cache(maxsize=8)
def sandboxed_template(chat_template: str):
    """Parsed once per template (a dataset renders one template per record, twice per turn)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = template_tojson
    env.globals.update(raise_exception=template_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict())
    return env.from_string(chat_template)


def template_raise(message):
    raise TemplateRefusal(message)


def template_tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: jinja's own escapes <, >, & and ' for HTML, which would change the
    text a model was trained on (tool schemas, markup in messages)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` only: the type itself would hand templates its unbound
    methods (`dict.update(message, ...)`), which the immutable sandbox checks on instances only."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def qa_example(record, where: str) -> Example:
    """{"context", "question", "answer"[, "answer_start"]} -> segments: the question, then the context
    with the answer as the one trained segment. The question comes first so that a causal model's
    context tokens have read it. An answer that occurs more than once needs `answer_start` (its character
    offset in the context, as SQuAD gives it): guessing the first occurrence would train on a wrong span
    as often as not."""
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("context", "question", "answer")):
        raise DataError(f"{where}: a QA record needs string fields \"context\", \"question\" and \"answer\"")
    context, answer = record["context"], record["answer"]
    if not answer.strip():
        raise DataError(f"{where}: the answer is empty")
    if "answer_start" not in record and context.count(answer) > 1:
        at = [i for i in range(len(context)) if context.startswith(answer, i)]
        raise DataError(f"{where}: the answer {answer[:40]!r} occurs {len(at)} times in the context (at characters "
                        f"{', '.join(map(str, at[:5]))}); add \"answer_start\" to say which one")
    start = record.get("answer_start", context.find(answer))
    found = isinstance(start, int) and not isinstance(start, bool) and start >= 0
    if not found or context[start : start + len(answer)] != answer:
        at = f" at answer_start {start!r}" if "answer_start" in record else ""
        raise DataError(f"{where}: the answer {answer[:40]!r} does not occur in the context{at}")
    end = start + len(answer)
    return Example(where, [(record["question"] + "\n", False), (context[:start], False), (answer, True),
                           (context[end:], False)])


def load_examples(path: str | Path, template: PromptTemplate | None = None) -> list[Example]:
    template = template or PromptTemplate()
    examples = [to_example(record, where, template) for record, where in read_records(path)]
    if not examples:
        raise DataError(f"{Path(path).name}: no records: the dataset is empty")
    return examples


# -- tokenizing ---------------------------------------------------------------------------------
def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's own post-processor puts before and after a text: [BOS] for Llama 2 / 3,
    [CLS] ... [SEP] for BERT, nothing for GPT-2 or SmolLM2 (whose BOS, <|im_start|>, starts chat turns
    and is never prepended). Read off one encoding, so tokenizer.json's processor is the only rule."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []  # a processor that rewrites the text's own ids: add nothing rather than guess


def tokenize(example: Example, tokenizer, max_length: int) -> TokenizedExample:
    """Prompt segments get label -100; trained segments keep their ids; the tokenizer's leading special
    tokens (special_tokens_around) stay untrained; EOS is appended and trained unless the chat template
    already ended the turn."""
    lead, _ = special_tokens_around(tokenizer)
    ids, labels = list(lead), [IGNORE_INDEX] * len(lead)
    for text, trained in example.segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if tokenizer.eos_token_id is not None and not example.ends_turn:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    return TokenizedExample(example.where, ids[:max_length], labels[:max_length], truncated)


def tokenize_span(example: Example, tokenizer, max_length: int) -> TokenizedExample:
    """QA: [BOS or CLS] question, context [SEP]; `span` = the first and last token that overlap the answer.

    The text is tokenized whole and the answer's characters mapped to tokens through the offsets, so
    the ids are the ones a user's question over the same context gets at inference time. (Tokenizing
    the answer on its own would change the ids wherever a BPE merge crosses its border, " 4" in
    "every 4 hours", and the changed ids would mark the answer for the model to find.)"""
    text = "".join(piece for piece, _ in example.segments)
    first = next(i for i, (_, trained) in enumerate(example.segments) if trained)
    char_start = sum(len(piece) for piece, _ in example.segments[:first])
    char_end = char_start + len(example.segments[first][0])
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    inside = [i for i, (lo, hi) in enumerate(offsets) if lo < char_end and hi > char_start]
    if not inside:
        raise DataError(f"{example.where}: the answer has no tokens")
    lead, tail = special_tokens_around(tokenizer)  # BERT: [CLS] ... [SEP]; Llama: [BOS]
    ids = lead + ids + tail
    start, end = inside[0] + len(lead), inside[-1] + len(lead)
    if end >= max_length:
        raise DataError(f"{example.where}: the answer ends at token {end}, past max_length {max_length}; "
                        "raise [data] max_length or shorten the context")
    return TokenizedExample(example.where, ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length),
                            len(ids) > max_length, span=(start, end))


def pack(examples: list[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Concatenate and cut into max_length rows: no padding wasted; attention crosses example borders."""
    ids = [i for ex in examples for i in ex.input_ids]
    labels = [lab for ex in examples for lab in ex.labels]
    return [
        TokenizedExample(f"packed[{k // max_length}]", ids[k : k + max_length], labels[k : k + max_length])
        for k in range(0, len(ids), max_length)
    ]


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask, labels (pads labelled -100).

    Classification rows carry one label each: `labels` is then (B,) class indices; QA rows an answer
    span each: (B, 2) first and last token. Rows of a task add "task" and "kind" (plain strings).
    """
    routing = task_of(batch) if batch[0].task is not None else {}
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    if batch[0].label is not None:
        labels = torch.tensor([ex.label for ex in batch], dtype=torch.long)
    if batch[0].span is not None:
        labels = torch.tensor([ex.span for ex in batch], dtype=torch.long)  # (B, 2)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, **routing}


def group_by_task(rows: list[TokenizedExample]) -> dict[str, list[TokenizedExample]]:
    """{task: its rows} in order of first appearance; {} for single-task rows (no row names a task)."""
    tagged = sum(row.task is not None for row in rows)
    if tagged and tagged < len(rows):
        raise ValueError(f"{tagged} of {len(rows)} rows name a task: "
                         "name every row's task (TokenizedExample.task) or none")
    groups: dict[str, list[TokenizedExample]] = {}
    for row in rows:
        if row.task is not None:
            groups.setdefault(row.task, []).append(row)
    return groups


def task_of(batch: list[TokenizedExample]) -> dict[str, str]:
    tasks = {(ex.task, ex.kind) for ex in batch}
    if len(tasks) > 1:
        raise ValueError(f"a batch must hold rows of one task, got {', '.join(sorted(f'{t} ({k})' for t, k in tasks))}")
    task, kind = tasks.pop()
    return {"task": task, "kind": kind}
