"""Every LoRA error says what was wrong and what to do: each is provoked here and its message checked."""
import json
import warnings

import peft
import pytest
import torch

from peftcore import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftcore.adapter_io import AdapterLoadError, config_from_dict
from peftcore.models import from_config
from peftcore.models.llama import LlamaConfig

PREFIX = "base_model.model.model.layers.0.self_attn"


def tiny_llama(hidden=16, **kwargs):
    torch.manual_seed(0)
    return from_config(LlamaConfig(vocab_size=37, hidden_size=hidden, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, **kwargs)).eval()


@pytest.fixture
def saved(tmp_path):
    """An r=4 q/v adapter saved in tmp_path."""
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4)).save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- targets --------------------------------------------------------------------------------------
def test_targets_matching_nothing_list_the_candidates():
    with pytest.raises(ValueError, match=r"target_modules=\['q_prj'\] matched no module of LlamaForCausalLM") as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))
    for name in ("q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"):
        assert name in str(err.value)
    assert "input_layernorm" not in str(err.value)  # only modules LoRA can adapt are candidates


def test_a_target_lora_cannot_adapt_is_named():
    with pytest.raises(TypeError, match=r"target 'model.norm' is a RMSNorm; LoRA adapts nn.Linear"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["norm"]))


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match=r"modules_to_save=\['head_x'\] matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["head_x"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "cannot be used when target_modules is a str"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "only applies together with layers_to_transform"),
    (dict(target_modules=["q_proj"], use_dora=True, lora_bias=True),
     "lora_bias=True is not supported together with use_dora"),
    (dict(target_modules=["q_proj"], bias="some"), "bias must be 'none', 'all' or 'lora_only', got 'some'"),
    (dict(target_modules=["q_proj"], r=0), "r must be a positive integer, got 0"),
    (dict(target_modules=["q_proj"], task_type="TOKEN_CLS"),
     "task_type 'TOKEN_CLS' is not supported; supported: CAUSAL_LM"),
])
def test_inconsistent_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("scheme, message", [
    ("pissa", r"init_lora_weights='pissa' takes the top r of a 8x16 weight: r=9 must be <= 8"),
    ("kaiming", r"init_lora_weights='kaiming': expected True, False, 'gaussian'"),
    ("pissa_niter_x", r"expected 'pissa' or 'pissa_niter_<int>'"),
])
def test_bad_init_schemes(scheme, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"], r=9, init_lora_weights=scheme))


# -- adapter files --------------------------------------------------------------------------------
def test_file_shapes_that_do_not_fit_the_config_name_key_and_both_shapes(saved):
    edit_config(saved, r=2)  # the file holds r=4 tensors
    with pytest.raises(AdapterLoadError,
                       match=rf"{PREFIX}.q_proj.lora_A.weight has shape \(4, 16\) but the model expects \(2, 16\)"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_an_adapter_for_another_width_names_key_and_both_shapes(saved):
    with pytest.raises(AdapterLoadError,
                       match=rf"{PREFIX}.q_proj.lora_A.weight has shape \(4, 16\) but the model expects \(4, 24\)"):
        PeftModel.from_pretrained(tiny_llama(hidden=24), saved)


def test_a_key_that_fits_nothing_and_a_missing_tensor(saved, tmp_path_factory):
    edit_config(saved, target_modules=["q_proj"])  # the file also holds v_proj tensors
    with pytest.raises(AdapterLoadError, match=rf"key {PREFIX}.v_proj.lora_A.weight fits no parameter of the model"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    edit_config(saved, target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(AdapterLoadError, match=rf"lacks 4 adapter tensor\(s\), e.g. {PREFIX}.k_proj.lora_A.weight"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_a_failed_load_adapter_leaves_no_half_loaded_adapter(saved):
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    edit_config(saved, r=2)
    with pytest.raises(AdapterLoadError):
        pm.load_adapter(saved, "other")
    assert list(pm.peft_config) == ["default"] and not any(".other." in k for k in pm.state_dict())


def test_a_failed_load_changes_nothing(tmp_path):
    """Keys and shapes are checked before any tensor is copied (bias="all" files write into the base model)."""
    pm = get_peft_model(tiny_llama(attention_bias=True), LoraConfig(target_modules=["q_proj"], r=4, bias="all"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith(".bias"):
                p.add_(1.0)
    pm.save_pretrained(tmp_path)
    edit_config(tmp_path, r=2)
    fresh = tiny_llama(attention_bias=True)
    expected = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"has shape \(4, 16\) but the model expects \(2, 16\)"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert all(torch.equal(v, expected[k.replace(".base_layer", "")])
               for k, v in fresh.state_dict().items() if "lora_" not in k)


def test_missing_adapter_files(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError,
                       match=r"no adapter_config.json in .*empty.*: expected an adapter saved by peftcore or HF PEFT"):
        PeftModel.from_pretrained(tiny_llama(), empty)
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors \(or adapter_model.bin\) in .*: "
                                                r"expected the adapter's weights"):
        PeftModel.from_pretrained(tiny_llama(), saved)


# -- adapter_config.json --------------------------------------------------------------------------
def test_a_config_for_another_method_or_an_unknown_one():
    with pytest.raises(ValueError, match="adapter_config.json is for PREFIX_TUNING, not LORA"):
        LoraConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="peft_type 'SHINY_NEW'; peftcore supports ADALORA, LORA"):
        config_from_dict({"peft_type": "SHINY_NEW", "r": 4})


def test_an_unknown_peft_type_in_a_folder(saved):
    edit_config(saved, peft_type="BOFT")
    with pytest.raises(ValueError, match="peft_type 'BOFT'; peftcore supports ADALORA, LORA, IA3"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_unknown_keys_are_ignored_while_off_and_refused_when_set():
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "lora_shiny": None})
    assert config.r == 2 and not hasattr(config, "lora_shiny")
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown key lora_shiny=3 .* delete the key"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "lora_shiny": 3})
    with pytest.raises(ValueError, match=r"use_qalora=True asks for QALoRA .*, which peftcore does not implement"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_qalora": True})


def test_the_config_peft_writes_loads_silently(tmp_path):
    peft.LoraConfig(target_modules=["q_proj"], r=2, task_type="CAUSAL_LM").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = config_from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert config.r == 2 and config.target_modules == ["q_proj"] and config.task_type == "CAUSAL_LM"


# -- adapters at run time -------------------------------------------------------------------------
@pytest.fixture
def two():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["v_proj"]))
    return pm


def test_unknown_adapter_names(two):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) 'c'; loaded: a, b"):
        two(ids, adapter_names=["a", "c"])
    for call in (two.set_adapter, two.delete_adapter, lambda n: two.merge_adapter([n])):
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) '__base__'; loaded: a, b"):
            call("__base__")  # only a batch row may ask for the base model


def test_mixed_batch_misuse(two):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2"):
        two.eval()(ids, adapter_names=["a", "b", "a"])
    with pytest.raises(RuntimeError,
                       match=r"adapter_names \(a mixed-adapter batch\) is for inference; call .eval\(\) first"):
        two.train()(ids, adapter_names=["a", "b"])
    two.eval().merge_adapter()
    with pytest.raises(RuntimeError,
                       match=r"a mixed-adapter batch needs unmerged adapters; call unmerge_adapter\(\) first"):
        two(ids, adapter_names=["a", "b"])


def test_merging_twice_warns_and_deleting_a_merged_adapter_raises(two):
    two.merge_adapter()
    with pytest.warns(UserWarning, match="adapter 'a' is already merged into Linear: nothing to do"):
        two.merge_adapter()
    with pytest.raises(ValueError, match="adapter 'a' is merged into the base weight; unmerge before deleting it"):
        two.delete_adapter("a")


def test_adding_an_existing_name_or_a_non_lora_config(two):
    with pytest.raises(ValueError, match="an adapter named 'b' exists already; delete_adapter"):
        two.add_adapter("b", LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(TypeError, match=r"weight-adapting \(LoRA, OFT, ...\) adapters; a dict needs its own PeftModel"):
        two.add_adapter("c", {"r": 2})
    with pytest.raises(TypeError, match="a PromptTuningConfig needs its own PeftModel"):
        two.add_adapter("c", PromptTuningConfig(num_virtual_tokens=2))
