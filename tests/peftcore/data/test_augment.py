"""[data.augment]: off by default, checked when the recipe loads, and applied only to records that parse."""
import json

import pytest

from peftcore.data.augment import AugmentConfig, load_synonyms
from peftcore.data.records import DataError, PromptTemplate, read_records
from peftcore.jobs.recipe import RecipeError, load_recipe
from peftcore.jobs.tasks import parse_records

ON = AugmentConfig(copies=2, ops=("word_dropout", "adjacent_swap", "char_noise"), probability=0.5)


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "d.jsonl:2: a record must be a JSON object"),
    ('"just a string"', "d.jsonl:2: a record must be a JSON object"),
    ({"messages": ["hi", "hello"]}, r"d.jsonl:2: messages\[0\] needs a role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"d.jsonl:2: messages\[0\]"),
    ({"messages": "hi"}, "d.jsonl:2: 'messages' must be a non-empty list"),
    ({"input": 3, "output": "x"}, "d.jsonl:2: field 'input' must be a string"),
    ({"output": "x"}, r"d.jsonl:2: missing field\(s\) input"),
])
@pytest.mark.parametrize("augment", [None, ON], ids=["plain", "augmented"])
def test_bad_records_name_file_and_line_with_augmentation_on(tmp_path, line, message, augment):
    """The same DataError with augmentation as without: records are checked before they are perturbed."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a b c", "output": "ok"}, line])
    with pytest.raises(DataError, match=message):
        parse_records(str(path), PromptTemplate(), augment=augment)


@pytest.mark.parametrize("line", [[1, 2], {"text": 3, "label": "yes"}, {"label": "yes"}])
def test_bad_classification_records_name_file_and_line_with_augmentation_on(tmp_path, line):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c", "label": "yes"}, line])
    with pytest.raises(DataError, match="d.jsonl:2: a classification record needs"):
        parse_records(str(path), PromptTemplate(), labels=["yes", "no"], augment=ON)


def test_augmented_copies_follow_the_checked_records(tmp_path):
    chat = {"messages": [{"role": "user", "content": "where is my order today"},
                         {"role": "assistant", "content": "here"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "how do I reset it", "output": "hold the button"}, chat])
    records = parse_records(str(path), PromptTemplate(), augment=ON)
    assert [r.where for r in records] == ["d.jsonl:1", "d.jsonl:2",
                                          "d.jsonl:1 (augmented #1)", "d.jsonl:2 (augmented #1)",
                                          "d.jsonl:1 (augmented #2)", "d.jsonl:2 (augmented #2)"]
    assert {r.reference for r in records} == {"hold the button", "here"}  # outputs are never perturbed


def test_augmentation_is_off_by_default(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a b c d", "output": "x"}, {"input": "e f g", "output": "y"}])
    assert AugmentConfig().copies == 0
    assert load_recipe().data.augment == AugmentConfig()  # the embedded default recipe
    (tmp_path / "recipe.toml").write_text('[model]\nbuiltin = "tiny-llama"\n[data]\ntrain = "d.jsonl"\n')
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert recipe.data.augment == AugmentConfig()
    records = parse_records(recipe.data.train, recipe.data.template, augment=recipe.data.augment)
    assert [r.where for r in records] == [where for _, where in read_records(path)] == ["d.jsonl:1", "d.jsonl:2"]


@pytest.mark.parametrize("kwargs, message", [
    ({"ops": ("shuffle",)}, r"unknown augmentation op\(s\) \['shuffle'\]"),
    ({"ops": "word_dropout"}, "ops must be a list"),
    ({"ops": ("synonym",)}, "needs synonyms_file"),
    ({"copies": -1}, "copies must be >= 0"),
    ({"probability": 1.5}, r"probability must be in \[0, 1\]"),
])
def test_augment_settings_are_checked_even_when_off(kwargs, message):
    """copies = 0 (the default) still rejects a misspelt op: it would fail later, when someone turns it on."""
    with pytest.raises((ValueError, TypeError), match=message):
        AugmentConfig(**kwargs)


def test_unknown_op_in_a_recipe_is_a_recipe_error_with_copies_0(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"input": "q", "output": "a"}\n')
    (tmp_path / "recipe.toml").write_text('[model]\nbuiltin = "tiny-llama"\n[data]\ntrain = "d.jsonl"\n'
                                          '[data.augment]\nops = ["word_dropout", "shufle"]\n')
    with pytest.raises(RecipeError, match=r"recipe.toml: \[data.augment\] unknown augmentation op\(s\) \['shufle'\]"):
        load_recipe(tmp_path / "recipe.toml")


def test_the_synonyms_file_is_relative_to_the_recipe_and_must_exist(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"input": "q", "output": "a"}\n')
    (tmp_path / "syn.txt").write_text("fast: quick\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nbuiltin = "tiny-llama"\n[data]\ntrain = "d.jsonl"\n'
                      '[data.augment]\ncopies = 1\nops = ["synonym"]\nsynonyms_file = "syn.txt"\n')
    monkeypatch.chdir(tmp_path.parent)  # not the recipe's folder
    assert load_recipe(recipe).data.augment.synonyms_file == str(tmp_path / "syn.txt")
    (tmp_path / "syn.txt").unlink()
    with pytest.raises(RecipeError, match="syn.txt"):
        load_recipe(recipe)


def test_an_input_output_record_with_a_text_field_has_its_input_perturbed(tmp_path):
    record = {"input": "alpha beta gamma delta epsilon", "output": "keep", "text": "metadata, not the prompt"}
    records = parse_records(str(write_jsonl(tmp_path / "d.jsonl", [record])), PromptTemplate(),
                            augment=AugmentConfig(copies=3, ops=("adjacent_swap",), probability=1.0))
    assert [r.shown for r in records[1:]] != [record["input"]] * 3
    assert all(sorted(r.shown.split()) == sorted(record["input"].split()) for r in records[1:])


def test_a_synonyms_file_with_a_bom_keeps_its_first_word(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark; read as text it would glue onto the first word."""
    path = tmp_path / "syn.txt"
    path.write_bytes(b"\xef\xbb\xbffast: quick\n")
    assert load_synonyms(path) == {"fast": ["quick"]}


def test_a_synonyms_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_bytes(b"fast: quick\nnew: fr\xe9sh\n")
    with pytest.raises(ValueError, match=r"^syn\.txt:2: not valid UTF-8 \(byte 0xe9 at column 8\)"):
        load_synonyms(path)
