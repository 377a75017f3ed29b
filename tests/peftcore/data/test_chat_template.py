"""Chat records under a checkpoint's own jinja chat template (peftcore.data.records.jinja_segments): which
text is prompt and which is trained, and bad conversations / templates as file:line errors."""
from datetime import date

import pytest

from peftcore.data.records import DataError, PromptTemplate, chat_prompt, to_example

# ChatML, as Qwen2 ships it: the generation prompt is the assistant header
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
# re-renders history: past assistant turns lose their <think> part, as some reasoning models' templates do
DROPS_THINKING = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                  "A: {{ m['content'].split('</think>')[-1] }}\n"
                  "{% else %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")

# what checkpoints ship: the date through strftime_now, {% continue %} / {% break %}, raise_exception,
# and tojson that leaves markup alone (jinja's own would write "<" as "\u003c")
REALISTIC = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% else %}"
             "{% set system = 'be helpful' %}{% endif %}"
             "<|system|>{{ system }} (today: {{ strftime_now('%Y-%m-%d') }})\n"
             "{% for m in messages %}{% if m['role'] == 'system' %}{% if not loop.first %}"
             "{{ raise_exception('the system message must come first') }}{% endif %}{% continue %}{% endif %}"
             "{% if m['content'] == '/end' %}{% break %}{% endif %}<|{{ m['role'] }}|>{{ m['content'] | tojson }}\n"
             "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

TURNS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
         {"role": "assistant", "content": "ciao"}]


def segments(messages, chat_template):
    return to_example({"messages": messages}, "chat.jsonl:3", PromptTemplate(chat_template=chat_template)).segments


def test_the_assistant_header_is_prompt_and_only_the_answer_trains():
    got = segments(TURNS, CHATML)
    assert [text for text, trained in got if trained] == ["hello<|im_end|>\n", "ciao<|im_end|>\n"]
    assert "".join(text for text, _ in got) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in TURNS)  # nothing lost or doubled
    assert ("<|im_start|>assistant\n", False) in got


def test_a_template_that_rewrites_history_trains_the_last_turn_only():
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>y</think>a2"}]
    assert segments(turns, DROPS_THINKING) == [("U: q1\nA: a1\nU: q2\nA: ", False), ("<think>y</think>a2\n", True)]


def test_raise_exception_in_a_template_names_file_and_line():
    with pytest.raises(DataError,
                       match="chat.jsonl:3: the chat template refuses this conversation: roles must alternate"):
        segments([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], STRICT)


def test_a_template_that_does_not_parse_names_file_line_and_its_own_line():
    with pytest.raises(DataError,
                       match=r"^chat.jsonl:3: the chat template does not parse \(its line 2\): Unexpected end"):
        segments(TURNS, "{% for m in messages %}\n{{ m.content }}")


def test_the_generation_prompt_ends_in_the_assistant_header():
    turn = [{"role": "user", "content": "hi"}]
    assert chat_prompt(turn, PromptTemplate(chat_template=CHATML)) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt(turn, PromptTemplate()) == "<|user|>\nhi\n<|assistant|>\n"
    # the default roles render a training record as prompt + answer: the prompt is that record's prompt
    record = to_example({"messages": [*turn, {"role": "assistant", "content": "yo"}]}, "c:1", PromptTemplate())
    assert record.prompt == chat_prompt(turn, PromptTemplate())


def test_a_realistic_checkpoint_template_renders_with_its_helpers():
    before = date.today().isoformat()
    got = segments([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<b>hello</b>"}], REALISTIC)
    today = {before, date.today().isoformat()}  # the test may cross midnight
    prompt = "".join(text for text, trained in got if not trained)
    assert any(prompt == f'<|system|>be helpful (today: {day})\n<|user|>"hi"\n<|assistant|>' for day in today), prompt
    assert [text for text, trained in got if trained] == ['"<b>hello</b>"\n']
    stopped = chat_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                           {"role": "user", "content": "/end"}, {"role": "user", "content": "unseen"}],
                          PromptTemplate(chat_template=REALISTIC))
    assert stopped.endswith('\n<|user|>"a"\n<|assistant|>') and "unseen" not in stopped


def test_raise_exception_in_a_realistic_template_names_file_and_line():
    turns = [{"role": "user", "content": "q"}, {"role": "system", "content": "late"},
             {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match="^chat.jsonl:3: the chat template refuses this conversation: "
                                        "the system message must come first$"):
        segments(turns, REALISTIC)
