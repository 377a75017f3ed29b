"""Chat records under a checkpoint's own jinja chat template (peftcore.data.jinja_segments): which
text is prompt and which is trained, and bad conversations / templates as file:line errors."""
import pytest

from peftcore.data import DataError, PromptTemplate, chat_prompt, to_example

# ChatML, as Qwen2 ships it: the generation prompt is the assistant header
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
# re-renders history: past assistant turns lose their <think> part, as some reasoning models' templates do
DROPS_THINKING = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                  "A: {{ m['content'].split('</think>')[-1] }}\n{% else %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")

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
    with pytest.raises(DataError, match="chat.jsonl:3: the chat template refuses this conversation: roles must alternate"):
        segments([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], STRICT)


def test_a_template_that_does_not_parse_names_file_and_line():
    with pytest.raises(DataError, match="chat.jsonl:3: the chat template does not parse"):
        segments(TURNS, "{% for m in messages %}")


def test_the_generation_prompt_ends_in_the_assistant_header():
    turn = [{"role": "user", "content": "hi"}]
    assert chat_prompt(turn, PromptTemplate(chat_template=CHATML)) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(turn, PromptTemplate()) == "<|user|>\nhi\n<|assistant|>\n"
    # the default roles render a training record as prompt + answer: the prompt is that record's prompt
    record = to_example({"messages": [*turn, {"role": "assistant", "content": "yo"}]}, "c:1", PromptTemplate())
    assert record.prompt == chat_prompt(turn, PromptTemplate())
