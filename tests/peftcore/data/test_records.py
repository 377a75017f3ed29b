import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftcore.data.augment import AugmentConfig, augment_records, load_synonyms
from peftcore.data.records import (
    IGNORE_INDEX,
    DataError,
    PromptTemplate,
    collate,
    load_examples,
    pack,
    read_records,
    to_example,
    tokenize,
)
from peftcore.data.report import data_report, format_report, write_report
from peftcore.jobs.tasks import parse_records, tokenize_records


class CharTokenizer:
    """One id per character: makes every loss-mask boundary checkable by hand."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):  # a Llama-style post-processor: BOS first
        return [self.bos_token_id] * add_special_tokens + [3 + (ord(c) % 500) for c in text]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loss_mask_covers_exactly_the_output_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"input": "ab", "output": "xyz"})])
    ex = load_examples(path)[0]
    tok = tokenize(ex, CharTokenizer(), max_length=1000)
    prompt_len = 1 + len(PromptTemplate().render({"input": "ab"}))  # BOS + rendered prompt
    assert tok.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tok.labels[prompt_len:] == tok.input_ids[prompt_len:]
    assert tok.input_ids[prompt_len:] == CharTokenizer().encode("xyz") + [2]


@given(inp=st.text(min_size=1, max_size=20), out=st.text(min_size=1, max_size=20), max_length=st.integers(2, 60))
def test_trained_tokens_are_the_output_suffix_property(inp, out, max_length):
    ex = to_example({"input": inp, "output": out}, "x:1", PromptTemplate())
    tok = tokenize(ex, CharTokenizer(), max_length)
    full = tokenize(ex, CharTokenizer(), 10**6)
    assert tok.input_ids == full.input_ids[:max_length] and tok.truncated == (len(full.input_ids) > max_length)
    trained = [i for i, lab in zip(full.input_ids, full.labels) if lab != IGNORE_INDEX]
    assert trained == CharTokenizer().encode(out) + [2]


def test_chat_records_train_only_assistant_turns(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ex = to_example({"messages": msgs}, "c:1", PromptTemplate())
    assert ex.response == "hello\nciao\n"
    jinja = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    ex = to_example({"messages": msgs}, "c:1", PromptTemplate(chat_template=jinja))
    assert [t for t, trained in ex.segments if trained] == ["[assistant]hello", "[assistant]ciao"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    (json.dumps({"input": "a"}), r"d.jsonl:2: missing field\(s\) output"),
    (json.dumps({"input": "a", "output": 3}), "d.jsonl:2: field 'output' must be a string"),
    (json.dumps([1, 2]), "d.jsonl:2: a record must be a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "d.jsonl:2: no assistant message"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"d.jsonl:2: messages\[0\] needs a role"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"input": "ok", "output": "ok"}), line])
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_json_array_errors_name_the_line_each_record_starts_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"input": "a", "output": "b"},\n  {"input": "c"}\n]\n')
    assert [where for _, where in read_records(path)] == ["d.json:2", "d.json:3"]
    with pytest.raises(DataError, match="d.json:3: missing field"):
        load_examples(path)


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", [""]))


def test_collate_and_pack():
    a = tokenize(to_example({"input": "a", "output": "b"}, "x:1", PromptTemplate()), CharTokenizer(), 100)
    b = tokenize(to_example({"input": "cc", "output": "dd"}, "x:2", PromptTemplate()), CharTokenizer(), 100)
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()
    packed = pack([a, b], max_length=16)
    assert [i for row in packed for i in row.input_ids] == a.input_ids + b.input_ids
    assert all(len(row.input_ids) == 16 for row in packed[:-1])


def test_report_counts_duplicates_conflicts_and_truncation(tmp_path):
    lines = [json.dumps(r) for r in ({"input": "q", "output": "a"}, {"input": "q", "output": "a"},
                                     {"input": "q", "output": "b"}, {"input": "long " * 20, "output": " "})]
    records = parse_records(str(write_jsonl(tmp_path / "d.jsonl", lines)), PromptTemplate())
    report = data_report(records, tokenize_records(records, CharTokenizer(), 64), 64)
    assert report["exact_duplicates"] == 1
    assert len(report["conflicting_outputs"]) == 1
    assert report["truncated"] == ["d.jsonl:4"] and report["empty_fields"] == ["d.jsonl:4"]
    assert sum(b["count"] for b in report["length_histogram"]) == 4
    text = format_report(report)
    assert "!! 1 exact duplicates" in text and "!! 1 inputs with conflicting outputs" in text
    assert json.loads(write_report(report, tmp_path).read_text())["records"] == 4


def report_of(path, template=None, labels=None, kind=None):
    records = parse_records(str(path), template or PromptTemplate(), labels, kind=kind)
    return data_report(records, tokenize_records(records, CharTokenizer(), 512), 512)


def chat(user, assistant):
    return {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def test_report_flags_empty_inputs_and_chat_turns_by_file_and_line(tmp_path):
    """The rendered prompt is never empty (it holds the template), so blank inputs are found in the
    fields the user wrote."""
    lines = [json.dumps(r) for r in ({"input": "", "output": "x"}, {"input": "   ", "output": "y"},
                                     {"input": "fine", "output": "z"},
                                     {"input": "\n\t", "output": "w", "instruction": "do"},
                                     chat("", "hello"), chat("hi", "  "), chat("hi", "hello"))]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    expected = ["d.jsonl:1", "d.jsonl:2", "d.jsonl:4", "d.jsonl:5", "d.jsonl:6"]  # an empty system turn is fine
    assert report_of(path)["empty_fields"] == expected
    jinja = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"  # role markers: never-empty segments
    assert report_of(path, PromptTemplate(chat_template=jinja))["empty_fields"] == expected
    assert "!! 5 with an empty input or output  e.g. d.jsonl:1, d.jsonl:2, d.jsonl:4" in format_report(report_of(path))


def test_report_flags_empty_classification_text(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl",
                       [json.dumps({"text": " ", "label": "yes"}), json.dumps({"text": "ok", "label": 1})])
    assert report_of(path, labels=["yes", "no"])["empty_fields"] == ["c.jsonl:1"]


def test_report_conflicts_show_the_users_input_not_the_template(tmp_path):
    lines = [json.dumps(r) for r in ({"input": "reset my password", "output": "a"},
                                     {"input": "reset my password", "output": "b"},
                                     {"input": "other", "output": "c"})]
    report = report_of(write_jsonl(tmp_path / "d.jsonl", lines))
    assert report["conflicting_outputs"] == ["reset my password"]
    assert "e.g. reset my password" in format_report(report)


def test_augmentation_is_seeded_and_touches_inputs_only(tmp_path):
    syn = tmp_path / "syn.txt"
    syn.write_text("# comment\nfast: quick, rapid\n")
    records = [({"input": "a fast red car drives home", "output": "keep me"}, "d:1")]
    config = AugmentConfig(copies=2, ops=("synonym", "adjacent_swap", "char_noise"), probability=0.9,
                           synonyms_file=str(syn), seed=3)
    first, second = augment_records(records, config), augment_records(records, config)
    assert first == second and len(first) == 3
    assert all(r["output"] == "keep me" for r, _ in first)
    assert any(r["input"] != records[0][0]["input"] for r, _ in first[1:])
    assert load_synonyms(syn) == {"fast": ["quick", "rapid"]}
    syn.write_text("no colon here\n")
    with pytest.raises(ValueError, match="syn.txt:1"):
        load_synonyms(syn)


@pytest.mark.parametrize("name, raw, line", [
    ("d.jsonl", b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "b"}\n', 2),
    ("d.json", b'[\n  {"input": "a", "output": "b"},\n\n  {"input": "x", "output": "\xff"}\n]\n', 4),
])
def test_invalid_utf8_names_file_and_line(tmp_path, name, raw, line):
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(DataError,
                       match=rf"^{name}:{line}: not valid UTF-8 \(byte 0x(e9|ff) at column \d+\)") as excinfo:
        read_records(tmp_path / name)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("name, text", [
    ("d.jsonl", '{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n'),
    ("d.json", '[{"input": "a", "output": "b"},\n {"input": "c", "output": "d"}]'),
])
def test_a_utf8_bom_is_accepted(tmp_path, name, text):
    """Windows editors save UTF-8 with a byte-order mark: the data is still the same data."""
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = read_records(tmp_path / name)
    assert [(r["input"], where) for r, where in records] == [("a", f"{name}:1"), ("c", f"{name}:2")]


def test_max_length_that_cuts_every_output_is_refused(tmp_path):
    lines = [json.dumps({"input": "question " * 3, "output": "answer"}) for _ in range(3)]
    records = parse_records(str(write_jsonl(tmp_path / "d.jsonl", lines)), PromptTemplate())
    prompt = 1 + len(PromptTemplate().render({"input": "question " * 3}))  # BOS + the rendered prompt
    with pytest.raises(DataError, match=rf"^d.jsonl: all 3 records are cut at max_length 20 before their output: "
                                        rf"no token would train; "
                                        rf"raise \[data\] max_length to at least {prompt + 1}") as excinfo:
        tokenize_records(records, CharTokenizer(), 20)
    assert "\n" not in str(excinfo.value)
    rows = tokenize_records(records, CharTokenizer(), prompt + 1)  # the limit it names: one token trains
    assert all(sum(lab != IGNORE_INDEX for lab in row.labels) == 1 for row in rows)


def test_max_length_that_cuts_some_outputs_is_only_reported(tmp_path):
    lines = [json.dumps({"input": "q", "output": "a"}), json.dumps({"input": "long " * 20, "output": "b"})]
    records = parse_records(str(write_jsonl(tmp_path / "d.jsonl", lines)), PromptTemplate())
    rows = tokenize_records(records, CharTokenizer(), 40)
    assert [row.truncated for row in rows] == [False, True]
    assert data_report(records, rows, 40)["truncated"] == ["d.jsonl:2"]


class NoBosTokenizer(CharTokenizer):
    """A post-processor that adds nothing (GPT-2, SmolLM2), though the tokenizer names a BOS token."""

    def encode(self, text, add_special_tokens=False):
        return super().encode(text, add_special_tokens=False)


SMOL_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_rows_start_with_what_the_tokenizers_post_processor_adds_and_nothing_else():
    ex = to_example({"input": "ab", "output": "xyz"}, "d:1", PromptTemplate(io_as_chat=False))
    assert tokenize(ex, CharTokenizer(), 100).input_ids[0] == CharTokenizer.bos_token_id
    row = tokenize(ex, NoBosTokenizer(), 100)
    assert row.input_ids == NoBosTokenizer().encode(ex.prompt + "xyz") + [NoBosTokenizer.eos_token_id]


def test_a_chat_template_ends_the_turn_so_no_second_end_token_is_trained():
    ex = to_example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "c:1",
                    PromptTemplate(chat_template=SMOL_TEMPLATE))
    row = tokenize(ex, NoBosTokenizer(), 200)
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert row.input_ids == NoBosTokenizer().encode(rendered)
    trained = [i for i, lab in zip(row.input_ids, row.labels) if lab != IGNORE_INDEX]
    assert trained == NoBosTokenizer().encode("yo<|im_end|>\n")


def test_input_output_records_on_a_chat_template_become_a_user_assistant_exchange():
    record = {"instruction": "be brief", "input": "hi", "output": "yo"}
    ex = to_example(record, "d:1", PromptTemplate(chat_template=SMOL_TEMPLATE))
    assert ex.prompt == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert ex.response == "yo<|im_end|>\n" and "###" not in ex.prompt
    opted_out = to_example(record, "d:1", PromptTemplate(chat_template=SMOL_TEMPLATE, io_as_chat=False))
    assert opted_out.prompt.startswith("### Instruction:")
