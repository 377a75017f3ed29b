"""AdaLoRA through PeftModel on a tiny random Llama (transformers' for PEFT, peftcore's loaded from the same
checkpoint), the same RNG state before each get_peft_model: the adapters must come out bit-equal, and then
logits, parameter counts (ranknum is a frozen parameter: it counts in the total, as in PEFT), state-dict keys,
several adapters and what PEFT refuses are compared."""
import peft
import pytest
import torch
import transformers

from peftcore import PeftModel, get_peft_model, quantize_model
from peftcore.adalora import AdaLoraConfig, AdaLoraLinear
from peftcore.models import load_pretrained
from tests.peftcore.adalora.pairs import ADAPTER_WORDS, adalora_kwargs, ids, logits, pair
from tests.peftcore.lora.test_vs_peft import VOCAB, file_keys, perturb
from tests.tolerances import assert_close

CASES = {
    "init_true": dict(),
    "random": dict(init_lora_weights=False),
    "all_linear_dropout": dict(target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1, init_r=3),
    "regex_alpha0": dict(target_modules=r".*layers\.1\.self_attn\.(k|o)_proj", init_lora_weights=False,
                         lora_alpha=-1),  # alpha <= 0: scaling = r, as in PEFT
    "modules_to_save_bias": dict(init_lora_weights=False, modules_to_save=["lm_head"], bias="lora_only"),
    "layers_to_transform": dict(init_lora_weights=False, layers_to_transform=[1], layers_pattern="layers"),
}


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_counts_and_logits_equal_peft(llama_folder, case):
    hf, ours = pair(llama_folder, **CASES[case])
    state, hf_state = ours.state_dict(), hf.state_dict()
    assert list(state) == list(hf_state)  # same keys, same order, ranknum included
    assert any(".ranknum.default" in k for k in state)
    for key, value in hf_state.items():
        if any(w in key for w in (*ADAPTER_WORDS, "ranknum")):
            assert torch.equal(state[key], value), key  # same seed, same draws: bit-equal
    assert trainable(ours) == trainable(hf)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    ranknums = sum(p.numel() for n, p in ours.named_parameters() if ".ranknum." in n)
    assert ranknums > 0 and ours.get_nb_trainable_parameters()[1] == sum(p.numel() for p in ours.parameters())
    with torch.no_grad():
        mine_logits = logits(ours.eval())
        assert_close(mine_logits, logits(hf.eval()))
        with ours.disable_adapter():
            base = logits(ours)
    if CASES[case].get("init_lora_weights", True):
        assert torch.equal(mine_logits, base)  # E = 0: the base model
    else:
        assert (mine_logits - base).abs().max() > 1e-3  # the adapter changes the output


def test_a_second_adapter_loads_for_inference_and_a_second_trainable_one_is_refused(llama_folder):
    kwargs = adalora_kwargs(init_lora_weights=False, target_modules=["q_proj", "up_proj"])
    hf, ours = pair(llama_folder, init_lora_weights=False)
    torch.manual_seed(3)
    hf.add_adapter("other", peft.AdaLoraConfig(**{**kwargs, "inference_mode": True}))
    torch.manual_seed(3)
    ours.add_adapter("other", AdaLoraConfig(**{**kwargs, "inference_mode": True}))
    mine, theirs = ours.state_dict(), hf.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], v) for k, v in theirs.items() if ".other" in k)
    assert trainable(ours) == trainable(hf) and not [n for n in trainable(ours) if ".other" in n]
    assert len(ours.step_hooks()) == 1  # one rank allocator, for the adapter that trains
    with torch.no_grad():
        default = logits(ours.eval())
        assert_close(default, logits(hf.eval()))  # the new adapter is not active
        hf.set_adapter("other"), ours.set_adapter("other")
        assert_close(logits(ours), logits(hf))
        assert (logits(ours) - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        hf.add_adapter("third", peft.AdaLoraConfig(**kwargs))
    with pytest.raises(ValueError, match=r"^AdaLoRA trains one adapter at a time and 'default' trains already: add "
                                         r"'third' with inference_mode=True"):
        ours.add_adapter("third", AdaLoraConfig(**kwargs))
    assert list(ours.peft_config) == list(hf.peft_config) == ["default", "other"]  # nothing half-added
    assert not [n for n, m in ours.named_modules() if isinstance(m, AdaLoraLinear) and "third" in m.lora_A]


def test_rankallocator_exists_only_for_a_trainable_adapter(llama_folder):
    _, ours = pair(llama_folder)
    assert ours.base_model.rankallocator is ours.step_hooks()[0]
    frozen = pair(llama_folder, inference_mode=True)[1]
    assert frozen.step_hooks() == [] and not hasattr(frozen.base_model, "rankallocator")  # PEFT's: no attribute


def test_update_and_allocate_without_a_trainable_adapter_says_so(llama_folder):
    frozen = pair(llama_folder, inference_mode=True)[1]
    with pytest.raises(AttributeError, match="no trainable AdaLoRA adapter"):
        frozen.base_model.update_and_allocate(0)


def test_gpt2_conv1d_through_peft_model_equals_peft_and_files_move_both_ways(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                                                 n_layer=2, n_head=4))
    perturb(model.parameters())
    model.save_pretrained(tmp_path / "gpt2")
    kwargs = adalora_kwargs(target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
    torch.manual_seed(1)
    hf = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                             peft.AdaLoraConfig(**kwargs))
    torch.manual_seed(1)
    ours = get_peft_model(load_pretrained(tmp_path / "gpt2"), AdaLoraConfig(**kwargs))
    assert ours.peft_config["default"].fan_in_fan_out is hf.peft_config["default"].fan_in_fan_out is True
    state, hf_state = ours.state_dict(), hf.state_dict()
    assert list(state) == list(hf_state)
    assert all(torch.equal(state[k], v) for k, v in hf_state.items() if "lora_" in k)
    hf.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    with torch.no_grad():
        reference = logits(hf.eval())
        assert_close(logits(ours.eval()), reference)
        loaded = PeftModel.from_pretrained(load_pretrained(tmp_path / "gpt2"), tmp_path / "theirs")
        assert_close(logits(loaded), reference)
        assert_close(logits(loaded.merge_and_unload()), reference)
        assert (reference - logits(load_pretrained(tmp_path / "gpt2"))).abs().max() > 1e-3


def test_a_quantized_base_trains_an_adalora_adapter_but_refuses_to_merge(llama_folder):
    model = quantize_model(load_pretrained(llama_folder), "nf4")
    ours = get_peft_model(model, AdaLoraConfig(**adalora_kwargs(init_lora_weights=False)))
    with torch.no_grad():
        out = ours(ids())
        with ours.disable_adapter():
            assert (ours(ids()) - out).abs().max() > 1e-3
    with pytest.raises(TypeError, match="cannot merge AdaLoRA into a quantized base layer in place"):
        ours.merge_adapter()
    with torch.no_grad():
        assert torch.equal(ours(ids()), out)  # nothing half-merged
