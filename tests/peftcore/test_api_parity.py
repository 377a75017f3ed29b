"""Issue 17 (APIs) against the installed peft, on one tiny random Llama with PEFT's adapter weights copied key for
key: several active adapters, enable / disable_adapter_layers, get_base_model, merges of named adapters with
safe_merge, the model card, and from_pretrained's autocast_adapter_dtype / low_cpu_mem_usage.

PEFT's PeftModel.set_adapter takes one name; several go through its LoraModel (`base_model.set_adapter(list)`),
which is what ours is compared with.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

import peftcore.lora.layer as lora_layer  # noqa: E402
from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from tests.peftcore.lora.test_vs_peft import LLAMA, VOCAB, file_keys, perturb  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

CONFIGS = {"cat": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
           "dog": dict(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random transformers Llama, every tensor perturbed."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    perturb(model.parameters())
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def hf_model(folder, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(folder).to(dtype)


def ids():
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model):
    out = model(input_ids=ids()) if isinstance(model, (peft.PeftModel, transformers.PreTrainedModel)) else model(ids())
    return getattr(out, "logits", out)


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def pair(folder, configs=CONFIGS):
    """Adapters "cat" and "dog" in both libraries (random A and B, perturbed), ours holding PEFT's weights."""
    torch.manual_seed(0)
    (first, kwargs), *rest = configs.items()
    theirs = peft.get_peft_model(hf_model(folder), peft.LoraConfig(**kwargs, init_lora_weights=False), first)
    ours = get_peft_model(load_pretrained(folder), LoraConfig(**kwargs), first)
    for name, kwargs in rest:
        theirs.add_adapter(name, peft.LoraConfig(**kwargs, init_lora_weights=False))
        ours.add_adapter(name, LoraConfig(**kwargs))
    perturb(p for n, p in theirs.named_parameters() if "lora_" in n or "modules_to_save" in n)
    ours.load_state_dict(theirs.state_dict())  # the same keys (tests/peftcore/lora/test_vs_peft.py)
    return theirs, ours


# -- 1. several active adapters ------------------------------------------------------------------
def test_two_active_adapters_add_up_as_in_peft(folder):
    theirs, ours = pair(folder)
    assert ours.active_adapter == "cat" and ours.active_adapters == theirs.active_adapters == ["cat"]
    with torch.no_grad():
        only_a = logits(ours)
        theirs.base_model.set_adapter(["cat", "dog"])
        ours.set_adapter(["cat", "dog"])
        both = logits(ours)
        assert_close(both, logits(theirs))
    assert (both - only_a).abs().max() > 1e-3, "dog must change the output, else nothing is tested"
    assert ours.active_adapters == theirs.active_adapters == ["cat", "dog"]
    assert ours.active_adapter == theirs.base_model.active_adapter == ["cat", "dog"]
    ours.set_adapter("dog")
    theirs.set_adapter("dog")
    assert ours.active_adapter == theirs.active_adapter == "dog"
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))


def test_training_with_two_active_adapters_trains_both_as_in_peft(folder):
    theirs, ours = pair(folder)
    theirs.base_model.set_adapter(["cat", "dog"])
    ours.set_adapter(["cat", "dog"])
    assert trainable(ours) == trainable(theirs) and any(".dog." in n for n in trainable(ours))
    logits(ours).square().mean().backward()
    logits(theirs).square().mean().backward()
    expected = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, expected[name].grad, atol=1e-5, rtol=1e-4)


def test_each_of_two_active_adapters_saves_as_peft_does(folder, tmp_path):
    theirs, ours = pair(folder)
    theirs.base_model.set_adapter(["cat", "dog"])
    ours.set_adapter(["cat", "dog"])
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "peft" / "cat", adapter_name="cat")
    loaded.load_adapter(tmp_path / "peft" / "dog", "dog")
    loaded.set_adapter(["cat", "dog"])
    for name in ("cat", "dog"):
        assert file_keys(tmp_path / "ours" / name) == file_keys(tmp_path / "peft" / name)
    with torch.no_grad():
        assert_close(logits(loaded), logits(theirs))


def test_two_active_adapters_with_copies_of_one_module_are_refused_as_in_peft(folder):
    configs = {name: {**kwargs, "modules_to_save": ["lm_head"]} for name, kwargs in CONFIGS.items()}
    theirs, ours = pair(folder, configs)
    before = trainable(ours)
    with pytest.raises(ValueError):
        theirs.base_model.set_adapter(["cat", "dog"])
    with pytest.raises(ValueError, match="modules_to_save copy"):
        ours.set_adapter(["cat", "dog"])
    assert ours.active_adapters == ["cat"] and trainable(ours) == before  # nothing changed by the refusal


def test_deleting_one_of_two_active_adapters_keeps_the_other_as_in_peft(folder):
    theirs, ours = pair(folder)
    theirs.base_model.set_adapter(["cat", "dog"])
    ours.set_adapter(["cat", "dog"])
    theirs.delete_adapter("cat")
    ours.delete_adapter("cat")
    assert ours.active_adapters == theirs.base_model.active_adapters == ["dog"]
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))


# -- 2. enable / disable, get_base_model, merges -----------------------------------------------------
def test_disable_and_enable_adapter_layers_as_in_peft(folder):
    theirs, ours = pair(folder)
    with torch.no_grad():
        adapted, base = logits(ours), logits(hf_model(folder))
        ours.disable_adapter_layers()
        theirs.disable_adapter_layers()
        assert_close(logits(ours), base)
        assert_close(logits(theirs), base)
    assert trainable(ours) == trainable(theirs) == []
    with ours.disable_adapter():  # a block inside disabled layers leaves them disabled, as PEFT's does
        pass
    with torch.no_grad():
        assert_close(logits(ours), base)
        ours.enable_adapter_layers()
        theirs.enable_adapter_layers()
        assert_close(logits(ours), adapted)
        assert_close(logits(theirs), adapted)
    assert trainable(ours) == trainable(theirs) != []


def test_disabling_merged_adapters_unmerges_them_as_in_peft(folder):
    theirs, ours = pair(folder)
    with torch.no_grad():
        adapted, base = logits(ours), logits(hf_model(folder))
        ours.merge_adapter()
        theirs.merge_adapter()
        ours.disable_adapter_layers()
        theirs.disable_adapter_layers()
        assert_close(logits(ours), base)
        assert_close(logits(theirs), base)
        ours.enable_adapter_layers()
        theirs.enable_adapter_layers()
        assert not ours.backend.is_merged()
        assert_close(logits(ours), adapted, atol=1e-4, rtol=1e-4)  # W + sBA - sBA rounds
        assert_close(logits(theirs), adapted, atol=1e-4, rtol=1e-4)


def test_disabling_a_bias_training_adapter_warns_as_peft_does(folder):
    theirs, ours = pair(folder, {"cat": {**CONFIGS["cat"], "bias": "all"}})
    for model in (ours, theirs):
        with pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias"):
            model.disable_adapter_layers()


def test_get_base_model_is_the_users_model_as_in_peft(folder):
    theirs, ours = pair(folder)
    assert theirs.get_base_model() is theirs.base_model.model
    assert ours.get_base_model() is ours.base_model.model
    assert set(ours.get_base_model().state_dict()) == set(theirs.get_base_model().state_dict())


@pytest.mark.parametrize("use_dora", [False, True])
def test_merging_named_adapters_with_safe_merge_equals_peft(folder, use_dora):
    configs = {"cat": CONFIGS["cat"], "dog": {**CONFIGS["dog"], "use_dora": use_dora}}
    theirs, ours = pair(folder, configs)
    with torch.no_grad():
        theirs.base_model.set_adapter(["cat", "dog"])
        ours.set_adapter(["cat", "dog"])
        expected = logits(theirs)
        ours.merge_adapter(adapter_names=["cat", "dog"], safe_merge=True)
        theirs.merge_adapter(adapter_names=["cat", "dog"], safe_merge=True)
        assert_close(logits(ours), expected, atol=1e-4, rtol=1e-4)
        assert_close(logits(theirs), expected, atol=1e-4, rtol=1e-4)
        ours.unmerge_adapter()
        theirs.unmerge_adapter()
        merged_ours = ours.merge_and_unload(adapter_names=["dog"], safe_merge=True)
        merged_theirs = theirs.merge_and_unload(adapter_names=["dog"], safe_merge=True)
        assert not any("lora" in k for k in merged_ours.state_dict())
        assert_close(logits(merged_ours), logits(merged_theirs), atol=1e-4, rtol=1e-4)


def test_safe_merge_of_a_broken_adapter_is_peft_value_error_and_merges_nothing(folder):
    theirs, ours = pair(folder)
    with torch.no_grad():
        for model in (ours, theirs):
            model.base_model.model.model.layers[1].mlp.down_proj.lora_B["dog"].weight[0, 0] = float("nan")
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        message = "NaNs detected in the merged weights. The adapter dog seems to be broken"
        for model in (ours, theirs):
            with pytest.raises(ValueError, match=message):
                model.merge_adapter(adapter_names=["dog"], safe_merge=True)
        with pytest.raises(ValueError, match=message):
            ours.merge_and_unload(adapter_names=["dog"], safe_merge=True)
        assert not ours.backend.is_merged()
        for key, value in ours.state_dict().items():  # no layer was merged
            torch.testing.assert_close(value, weights[key], rtol=0, atol=0, equal_nan=True)
        ours.merge_adapter(adapter_names=["dog"])  # unsafe: merged as asked, as in PEFT
        assert ours.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.isnan().any()


# -- 4. files ------------------------------------------------------------------------------------------
def front_matter(path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


def test_save_pretrained_writes_a_model_card_with_peft_header(folder, tmp_path):
    theirs, _ = pair(folder, {"cat": CONFIGS["cat"]})
    ours = get_peft_model(load_pretrained(folder), LoraConfig(**CONFIGS["cat"], base_model_name_or_path=str(folder)),
                          adapter_name="default")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    card, reference = front_matter(tmp_path / "ours" / "README.md"), front_matter(tmp_path / "peft" / "README.md")
    for key in ("base_model", "library_name"):
        assert card[key] == reference[key]
    assert {"lora", f"base_model:adapter:{folder}"} <= set(card["tags"]) & set(reference["tags"])
    text = (tmp_path / "ours" / "README.md").read_text()
    assert "- peftcore 0.1.0" in text and "(LORA)" in text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card\n")
    ours.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card\n"  # a person's card is kept


@pytest.fixture(scope="module")
def fp32_adapter(folder, tmp_path_factory):
    """A PEFT DoRA + LoRA adapter saved from the fp32 model (fp32 tensors on disk), as .safetensors and as .bin."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(hf_model(folder), peft.LoraConfig(
        target_modules=["q_proj", "o_proj"], r=4, use_dora=True, init_lora_weights=False))
    perturb(p for p in theirs.parameters() if p.requires_grad)
    path = tmp_path_factory.mktemp("fp32_adapter")
    theirs.save_pretrained(path / "st")
    theirs.save_pretrained(path / "bin", safe_serialization=False)
    return path


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("low_cpu", [False, True])
def test_from_pretrained_flags_on_a_bf16_base_give_peft_dtypes_and_outputs(folder, fp32_adapter, autocast, low_cpu):
    theirs = peft.PeftModel.from_pretrained(hf_model(folder, torch.bfloat16), fp32_adapter / "st",
                                            autocast_adapter_dtype=autocast)
    ours = PeftModel.from_pretrained(load_pretrained(folder, dtype=torch.bfloat16), fp32_adapter / "st",
                                     autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu)
    assert {n: p.dtype for n, p in adapter_tensors(ours).items()} == \
        {n: p.dtype for n, p in adapter_tensors(theirs).items()}
    assert not any(p.is_meta for p in ours.parameters())
    # fp32 adapters hold the file's values exactly whatever low_cpu_mem_usage says. PEFT 0.21.2 with
    # low_cpu_mem_usage=True first casts them to the bf16 base's dtype, then back up: a rounding we do not copy.
    expected = adapter_tensors(theirs)
    assert all(torch.equal(p, expected[n]) for n, p in adapter_tensors(ours).items())
    with torch.no_grad():
        assert_close(logits(ours).float(), logits(theirs).float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("file", ["st", "bin"])
def test_low_cpu_mem_usage_runs_no_init_and_loads_peft_outputs(folder, fp32_adapter, monkeypatch, file):
    """With low_cpu_mem_usage the adapter is created on the meta device: kaiming and DoRA's weight norm never
    run on a real tensor (without it they do, so the check can fail), and the loaded model gives PEFT's output."""
    seen = []

    def spy(fn, tensor_of):
        def wrapped(*args, **kwargs):
            seen.append(tensor_of(*args, **kwargs).device.type)
            return fn(*args, **kwargs)
        return wrapped

    bases = [load_pretrained(folder), load_pretrained(folder)]  # built before the spies: their own init is not ours
    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy(nn.init.kaiming_uniform_, lambda tensor, *a, **k: tensor))
    monkeypatch.setattr(lora_layer, "dora_row_norm", spy(lora_layer.dora_row_norm, lambda W, A, *a: A))
    PeftModel.from_pretrained(bases[0], fp32_adapter / file)
    assert "cpu" in seen
    seen.clear()
    ours = PeftModel.from_pretrained(bases[1], fp32_adapter / file, low_cpu_mem_usage=True)
    assert set(seen) <= {"meta"} and not any(p.is_meta for p in ours.parameters())
    monkeypatch.undo()
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), fp32_adapter / file, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))
    ours.load_adapter(fp32_adapter / file, "again", low_cpu_mem_usage=True)
    ours.set_adapter("again")
    with torch.no_grad():
        assert_close(logits(ours), logits(theirs))
