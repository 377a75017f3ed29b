"""A string target_modules is a full-match regex (HF PEFT): `"q_proj"` matches nothing while the candidates
list q_proj, so the error says why and gives the list form or a regex that would match."""
import json
import re

import pytest
import torch

from peftcore import LoraConfig, get_peft_model
from peftcore.lora.layer import LoraLinear
from peftcore.models import from_config
from peftcore.models.llama import LlamaConfig


def tiny_llama():
    torch.manual_seed(0)
    return from_config(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)).eval()


def message(target_modules) -> str:
    with pytest.raises(ValueError, match="matched no module of LlamaForCausalLM") as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=target_modules))
    return str(err.value)


def test_a_plain_string_names_the_regex_rule_and_the_list_form():
    text = message("q_proj")
    assert "Candidates: " in text and "q_proj" in text.split("Candidates: ")[1]
    assert "a regex that must match a whole module name, e.g. 'model.layers.0.self_attn.q_proj'" in text
    assert "target_modules = [\"q_proj\"] or the regex '.*q_proj'" in text
    assert "\n" not in text


def test_the_suggestions_it_gives_do_match():
    for target in ("q_proj", "q_proj|v_proj"):
        text = message(target)
        listed = re.search(r"target_modules = (\[.*?\])", text).group(1)
        regex = re.search(r"or the regex '(.*?)'", text).group(1)
        assert listed == "[" + ", ".join(f'"{p}"' for p in target.split("|")) + "]"
        for form in (json.loads(listed), regex):  # the list as TOML / JSON writes it
            wrapped = get_peft_model(tiny_llama(), LoraConfig(target_modules=form))
            adapted = {n.rsplit(".", 1)[-1] for n, m in wrapped.named_modules() if isinstance(m, LoraLinear)}
            assert adapted == set(target.split("|"))


def test_a_real_regex_gets_the_rule_but_no_rewrite():
    text = message(r".*\.q_prj")
    assert "a regex that must match a whole module name" in text and "or the regex" not in text


def test_a_list_target_keeps_its_message():
    text = message(["q_prj"])
    assert text.startswith("target_modules=['q_prj'] matched no module of LlamaForCausalLM. Candidates: ")
    assert "regex" not in text


def test_a_string_naming_no_module_suggests_no_rewrite_that_would_fail_too():
    text = message("q_prj")
    assert "a regex that must match a whole module name" in text and "or the regex" not in text
