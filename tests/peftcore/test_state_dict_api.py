"""PEFT's module-level functions against the installed peft: get_peft_model_state_dict, set_peft_model_state_dict and
inject_adapter_in_model give PEFT's keys and values, and state dicts move both ways between the two libraries.

The PeftModel pairs (PEFT's adapter, loaded here) come from tests/peftcore/lora/test_vs_peft.py.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore import (  # noqa: E402
    LoraConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftcore.adapter_io import AdapterLoadError  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from tests.peftcore.lora.test_vs_peft import (  # noqa: E402, F401 (checkpoints: a fixture)
    Pair,
    checkpoints,
    hf_logits,
    hf_model,
    our_logits,
    perturb,
)
from tests.tolerances import assert_close  # noqa: E402

CASES = ["q_v_llama", "dora", "modules_to_save", "bias_all", "embedding_targets", "gpt2_conv1d", "bert_seq_cls"]


@pytest.fixture(scope="module", params=CASES)
def pair(request, checkpoints, tmp_path_factory):  # noqa: F811 (the imported fixture)
    return Pair(request.param, checkpoints, tmp_path_factory)


def fresh_pair(pair, seed=7):
    """Both libraries' models for the pair's case with other random adapter weights than the pair's."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(hf_model(pair.checkpoints, pair.family),
                                 peft.LoraConfig(**pair.kwargs, init_lora_weights=False)).eval()
    ours = get_peft_model(load_pretrained(pair.checkpoints[pair.family]),
                          LoraConfig(**pair.kwargs, init_lora_weights=False)).eval()
    return theirs, ours


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert list(got) and set(got) == set(expected)
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key


def test_get_peft_model_state_dict_equals_peft(pair):
    assert_same_tensors(get_peft_model_state_dict(pair.ours), peft.get_peft_model_state_dict(pair.hf))


def test_a_peft_state_dict_loads_here_and_ours_loads_in_peft(pair):
    theirs, ours = fresh_pair(pair)
    assert (our_logits(ours, pair.family) - pair.expected).abs().max() > 1e-3  # other weights: the load must work
    result = set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(pair.hf))
    assert_close(our_logits(ours, pair.family), pair.expected)
    reference = peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(pair.ours))
    assert_close(hf_logits(theirs, pair.family), pair.expected)
    assert set(result.missing_keys) == set(reference.missing_keys) and result.unexpected_keys == []
    assert reference.unexpected_keys == []


def test_a_given_state_dict_supplies_the_values_as_in_peft(pair):
    doubled = {k: 2 * v for k, v in pair.ours.state_dict().items()}
    assert_same_tensors(get_peft_model_state_dict(pair.ours, state_dict=doubled),
                        peft.get_peft_model_state_dict(pair.hf, state_dict=doubled))


def test_a_second_adapter_by_name(checkpoints, tmp_path_factory):  # noqa: F811
    pair = Pair("q_v_llama", checkpoints, tmp_path_factory)
    config = dict(target_modules=["k_proj", "down_proj"], r=2, init_lora_weights=False)
    pair.hf.add_adapter("dog", peft.LoraConfig(**config))
    perturb(p for n, p in pair.hf.named_parameters() if ".dog." in n)
    pair.ours.add_adapter("dog", LoraConfig(**config))
    set_peft_model_state_dict(pair.ours, peft.get_peft_model_state_dict(pair.hf, adapter_name="dog"), "dog")
    assert_same_tensors(get_peft_model_state_dict(pair.ours, adapter_name="dog"),
                        peft.get_peft_model_state_dict(pair.hf, adapter_name="dog"))
    pair.hf.set_adapter("dog")
    pair.ours.set_adapter("dog")
    assert_close(our_logits(pair.ours, "llama"), hf_logits(pair.hf, "llama"))


@pytest.mark.parametrize("base", ["transformers", "peftcore"])
def test_inject_adapter_in_model_equals_peft(checkpoints, base):  # noqa: F811
    """LoRA layers straight into a model (ours: into a transformers model too): keys, trainable tensors, state dict,
    outputs."""
    kwargs = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, bias="all", init_lora_weights=False)
    torch.manual_seed(8)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), hf_model(checkpoints, "llama"))
    perturb(p for n, p in theirs.named_parameters() if "lora_" in n)
    model = hf_model(checkpoints, "llama") if base == "transformers" else load_pretrained(checkpoints["llama"])
    ours = inject_adapter_in_model(LoraConfig(**kwargs), model)
    assert ours is model and set(ours.peft_config) == {"default"}
    assert set(ours.state_dict()) == set(theirs.state_dict())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    expected = peft.get_peft_model_state_dict(theirs)
    result = set_peft_model_state_dict(ours, expected)
    assert result.unexpected_keys == [] and not any("lora_" in k for k in result.missing_keys)
    assert_same_tensors(get_peft_model_state_dict(ours), expected)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = ours(ids)
        assert_close(getattr(got, "logits", got), theirs(ids).logits)


def test_inject_into_a_plain_module_with_modules_to_save_and_a_peft_model_state_dict(checkpoints):  # noqa: F811
    """A user's nn.Sequential, as PEFT: keys have no prefix; a PeftModel's (prefixed) state dict loads into it."""
    base = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    kwargs = dict(target_modules=["1"], modules_to_save=["3"], r=2, init_lora_weights=False)
    torch.manual_seed(10)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), copy.deepcopy(base))
    ours = inject_adapter_in_model(LoraConfig(**kwargs), copy.deepcopy(base))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    perturb(p for p in wrapped.parameters() if p.requires_grad)
    state = peft.get_peft_model_state_dict(wrapped)
    assert all(k.startswith("base_model.model.") for k in state)
    # PEFT 0.21.2 looks modules_to_save keys up without the prefix it strips (a KeyError): it gets them unprefixed
    unprefixed = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result, reference = set_peft_model_state_dict(ours, state), peft.set_peft_model_state_dict(theirs, unprefixed)
    assert result.missing_keys == reference.missing_keys and result.unexpected_keys == reference.unexpected_keys
    assert_same_tensors(get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        assert_close(ours(ids), wrapped(ids))
        assert_close(theirs(ids), wrapped(ids))


def test_inject_with_low_cpu_mem_usage_is_filled_by_set_peft_model_state_dict(checkpoints):  # noqa: F811
    kwargs = dict(target_modules=["q_proj", "o_proj"], r=4, use_dora=True, init_lora_weights=False)
    torch.manual_seed(11)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), hf_model(checkpoints, "llama"))
    perturb(p for n, p in theirs.named_parameters() if "lora_" in n)
    ours = inject_adapter_in_model(LoraConfig(**kwargs), load_pretrained(checkpoints["llama"]), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in ours.named_parameters() if "lora_" in n)
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not any(p.is_meta for p in ours.parameters())
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits)


def test_a_prompt_state_dict_is_peft_prompt_embeddings(checkpoints):  # noqa: F811
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(13)
    theirs = peft.get_peft_model(hf_model(checkpoints, "llama"), peft.PromptTuningConfig(**config))
    ours = get_peft_model(load_pretrained(checkpoints["llama"]), PromptTuningConfig(**config))
    expected = peft.get_peft_model_state_dict(theirs)
    result = set_peft_model_state_dict(ours, expected)
    assert result == ([], []) and set(expected) == {"prompt_embeddings"}
    assert_same_tensors(get_peft_model_state_dict(ours), expected)


def test_a_state_dict_of_the_wrong_shape_is_an_error_naming_the_key(checkpoints):  # noqa: F811
    ours = get_peft_model(load_pretrained(checkpoints["llama"]), LoraConfig(target_modules=["q_proj"], r=4))
    state = get_peft_model_state_dict(ours)
    key = next(iter(state))
    with pytest.raises(AdapterLoadError, match=rf"{key.replace('.weight', '.default.weight')} has shape \(3, 4\)"):
        set_peft_model_state_dict(ours, {**state, key: torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="adds LoRA adapters, not a PromptTuningConfig"):
        inject_adapter_in_model(PromptTuningConfig(num_virtual_tokens=2), transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2)))
