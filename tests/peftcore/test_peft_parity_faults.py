"""Faults where peftcore parted from HF PEFT (the reliability issue, items 1-12), checked against the installed peft.

Each item has a test that failed on the code before its fix; the remaining cases guard what already matched
(inert options, adapters loaded frozen, prompt encoder dtypes). Where PEFT has a bug we do not copy, the test
says so.
"""
import copy
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import peftcore.kernels.dispatch as dispatch  # noqa: E402
from peftcore import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402
from peftcore.adapter_io import read_adapter_config  # noqa: E402
from peftcore.analysis.lowrank import inspect_adapter  # noqa: E402
from peftcore.kernels.lora_torch import LoraLinearFunction  # noqa: E402
from peftcore.models import load_pretrained  # noqa: E402
from peftcore.models.quantized import QuantLinear  # noqa: E402
from tests.peftcore.lora.test_vs_peft import LLAMA, VOCAB, file_keys, perturb  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random transformers Llama (no biases), every tensor perturbed."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    perturb(model.parameters())
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def hf_model(folder, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(folder).to(dtype).eval()


def ids():
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    out = model(input_ids=ids()) if isinstance(model, peft.PeftModel) else model(ids())
    return getattr(out, "logits", out)


def peft_adapter(folder, path, dtype=torch.float32, **kwargs):
    """A PEFT adapter with random A and B (the output moves), saved in `path`. -> the PEFT model."""
    torch.manual_seed(2)
    safe = kwargs.pop("safe", True)
    kwargs = {"target_modules": TARGETS, "r": 4, **kwargs}
    hf = peft.get_peft_model(hf_model(folder, dtype), peft.LoraConfig(**kwargs, init_lora_weights=False))
    perturb(p for p in hf.parameters() if p.requires_grad)
    hf.eval().save_pretrained(path, safe_serialization=safe)
    return hf


def edit_config(path, **changes):
    config = path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# -- 1. options peftcore does not implement -----------------------------------------------------------
REFUSED = {  # each changes what the adapter computes (or the model it applies to)
    "alora_invocation_tokens": [5, 6], "use_qalora": True, "layer_replication": [[0, 2], [1, 2]],
    "monteclora_config": {"num_samples": 2}, "use_bdlora": {"target_matrix": "A"}, "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.1}, "velora_config": {"num_groups": 4}, "ensure_weight_tying": True,
}
INERT = {  # init-time or other-framework options: trained weights do not depend on them here
    "loftq_config": {"loftq_bits": 4}, "eva_config": {"rho": 2.0}, "corda_config": {"cache_file": "c.pt"},
    "lora_ga_config": {"direction": "ArB2r"}, "megatron_config": {"tensor_model_parallel_size": 1},
    "megatron_core": "my_megatron.core", "qalora_group_size": 32,
}


@pytest.fixture(scope="module")
def saved(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    peft_adapter(folder, path)
    return path


def copy_of(saved, tmp_path, **changes):
    tmp_path.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    edit_config(tmp_path, **changes)
    return tmp_path


@pytest.mark.parametrize("key", list(REFUSED))
def test_an_unimplemented_option_that_changes_the_math_is_refused(folder, saved, tmp_path, key):
    adapter = copy_of(saved, tmp_path, **{key: REFUSED[key]})
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(load_pretrained(folder), adapter)
    message = one_line(err)
    assert f"{key}={REFUSED[key]!r}" in message and str(adapter / "adapter_config.json") in message


@pytest.mark.parametrize("key", list(INERT))
def test_an_inert_option_warns_and_the_adapter_computes_what_peft_does(folder, saved, tmp_path, key):
    adapter = copy_of(saved, tmp_path, **{key: INERT[key]})
    with pytest.warns(UserWarning, match=rf"{key}=.*ignored"):
        ours = PeftModel.from_pretrained(load_pretrained(folder), adapter)
    assert_close(logits(ours), logits(peft.PeftModel.from_pretrained(hf_model(folder), saved)))


@pytest.mark.parametrize("value", [None, False, [], {}, ""])
def test_an_unknown_key_that_is_off_loads_silently(folder, saved, tmp_path, value):
    adapter = copy_of(saved, tmp_path, lora_shiny_new_option=value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(load_pretrained(folder), adapter)


@pytest.mark.parametrize("value", [True, 3, "fast", [1]])
def test_an_unknown_key_that_is_set_is_refused_with_what_to_do(folder, saved, tmp_path, value):
    adapter = copy_of(saved, tmp_path, lora_shiny_new_option=value)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(load_pretrained(folder), adapter)
    message = one_line(err)
    assert f"lora_shiny_new_option={value!r}" in message and "adapter_config.json" in message
    assert "delete the key" in message


# -- 2. fp32 adapters on half-precision bases ---------------------------------------------------------
def dtypes(model) -> dict:
    return {n: p.dtype for n, p in model.named_parameters()}


PLAIN_CASES = [dict(target_modules=["0", "1", "3"]), dict(target_modules=["1", "3"], lora_bias=True),
               dict(target_modules=["0", "1"], use_dora=True)]


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("kwargs", PLAIN_CASES, ids=["lora", "lora_bias", "dora"])
def test_adapter_dtypes_and_outputs_on_a_bf16_base_equal_peft(kwargs, autocast):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    config = dict(kwargs, r=2, lora_alpha=4, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), autocast_adapter_dtype=autocast)
    perturb(p for p in reference.parameters() if p.requires_grad)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config), autocast_adapter_dtype=autocast)
    assert dtypes(ours) == dtypes(reference)
    assert any(d == (torch.float32 if autocast else torch.bfloat16) for n, d in dtypes(ours).items() if "lora_" in n)
    ours.load_state_dict(reference.state_dict())
    x = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        if autocast:  # the same operations in the same dtypes: the same bits
            assert torch.equal(ours(x), reference(x))
        else:  # PEFT rounds to bf16 after each op (DoRA's norm too), our addmm once: equal to a few bf16 steps
            ours_out, theirs = ours(x).double(), reference(x).double()
            assert (ours_out - theirs).norm() <= 2**-5 * theirs.norm()


def test_fp32_adapters_on_a_bf16_model_load_like_peft_and_take_small_updates(folder, tmp_path):
    """from_pretrained and load_adapter upcast as PEFT's do, with PEFT's logits; the point of fp32: a step
    below bf16's resolution (2^-8 relative) still moves the adapter."""
    peft_adapter(folder, tmp_path / "a", torch.bfloat16, target_modules=["q_proj", "v_proj", "embed_tokens"])
    peft_adapter(folder, tmp_path / "b", torch.bfloat16, target_modules=["o_proj"], use_dora=True)
    reference = peft.PeftModel.from_pretrained(hf_model(folder, torch.bfloat16), tmp_path / "a")
    reference.load_adapter(tmp_path / "b", "b")
    ours = PeftModel.from_pretrained(load_pretrained(folder, dtype=torch.bfloat16), tmp_path / "a", is_trainable=True)
    ours.load_adapter(tmp_path / "b", "b")
    assert dtypes(ours) == dtypes(reference)
    assert_close(logits(ours), logits(reference))
    kept = PeftModel.from_pretrained(load_pretrained(folder, dtype=torch.bfloat16), tmp_path / "a", is_trainable=True,
                                     autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}
    for model, moves in ((ours, True), (kept, False)):
        A = model.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        before = A.detach().clone()
        with torch.no_grad():
            A.add_(A * 1e-3)  # an optimizer step of 0.1% of the weight
        assert bool((A != before).any()) == moves
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_the_fused_paths_leave_fp32_adapters_on_a_bf16_base_to_the_torch_path(monkeypatch, quantize):
    linear = nn.Linear(64, 16, dtype=torch.bfloat16)
    base = nn.Sequential(QuantLinear.from_linear(linear, quantize) if quantize else linear)
    layer = get_peft_model(base, LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)).model[0]
    calls = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # as on a GPU
    assert not layer.can_fuse(x, None)  # the Triton kernels (lora_matmul, quant_matmul) take one dtype throughout
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    y = layer(x)
    assert not calls and y.dtype == torch.bfloat16
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = (layer.base_layer(x).float() + s * (x.float() @ A.T) @ B.T).bfloat16()  # PEFT's lora.Linear.forward
    assert torch.equal(y, expected)


# -- 3. an embedding targeted by a regex string is saved with its base table --------------------------
@pytest.mark.parametrize("where, targets", [("model", r"^embed_tokens"), ("causal", r"model\.embed_tokens|.*\.q_proj")])
def test_a_regex_targeted_embedding_is_saved_as_peft_saves_it(folder, tmp_path, where, targets):
    if where == "model":  # a transformers base without a head: the embedding is a top-level module
        torch.manual_seed(0)
        base = transformers.LlamaModel(transformers.LlamaConfig(**LLAMA))
        theirs, ours = copy.deepcopy(base), base
    else:
        theirs, ours = hf_model(folder), load_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True"
        peft.get_peft_model(theirs, peft.LoraConfig(target_modules=targets, r=2)).save_pretrained(tmp_path / "peft")
    get_peft_model(ours, LoraConfig(target_modules=targets, r=2)).save_pretrained(tmp_path / "ours")
    expected = file_keys(tmp_path / "peft")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in expected)
    assert file_keys(tmp_path / "ours") == expected


# -- 4. lora_bias on a base layer without bias --------------------------------------------------------
def test_lora_bias_without_a_base_bias_warns_runs_and_refuses_to_merge_as_peft(folder, tmp_path):
    with pytest.warns(UserWarning, match="has no bias"):
        reference = peft_adapter(folder, tmp_path, lora_bias=True)
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        copy.deepcopy(reference).merge_adapter()
    with pytest.warns(UserWarning, match=r"lora_bias=True but .*q_proj.* has no bias"):
        ours = PeftModel.from_pretrained(load_pretrained(folder), tmp_path)
    assert_close(logits(ours), logits(reference))
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        ours.merge_adapter()
    assert "lora_bias=True" in one_line(err) and "has no bias" in str(err.value)
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())  # nothing half merged
    assert_close(logits(ours), logits(reference))


# -- 5. merging twice ----------------------------------------------------------------------------------
def test_merging_twice_warns_and_changes_nothing_as_in_peft(folder, saved):
    reference = peft.PeftModel.from_pretrained(hf_model(folder), saved)
    reference.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        reference.merge_adapter()
    ours = PeftModel.from_pretrained(load_pretrained(folder), saved)
    ours.merge_adapter()
    once = logits(ours)
    with pytest.warns(UserWarning, match="'default' is already merged"):
        ours.merge_adapter()
    assert torch.equal(logits(ours), once)
    assert_close(once, logits(reference), atol=1e-4, rtol=1e-4)


# -- 6. disable_adapter freezes the adapters inside ------------------------------------------------------
@pytest.mark.parametrize("is_trainable", [True, False])
def test_disable_adapter_freezes_adapters_inside_and_restores_them(folder, tmp_path, is_trainable):
    config = peft.LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True, modules_to_save=["lm_head"], r=4)
    peft.get_peft_model(hf_model(folder), config).save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path, is_trainable=is_trainable)
    ours = PeftModel.from_pretrained(load_pretrained(folder), tmp_path, is_trainable=is_trainable)
    before = trainable(ours)
    assert before == trainable(reference) and bool(before) == is_trainable
    with reference.disable_adapter(), ours.disable_adapter():
        assert trainable(ours) == trainable(reference) == []
    # PEFT 0.21.2 re-enables gradients for every adapter on exit, even one loaded for inference (is_trainable
    # False); we restore what was set before the block, which equals PEFT's state for a trainable adapter.
    assert trainable(ours) == before


# -- 7. load_adapter(is_trainable=...) ------------------------------------------------------------------
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("second", [True, False])
def test_load_adapter_trains_the_loaded_adapter_when_asked_as_peft(folder, tmp_path, first, second):
    peft.get_peft_model(hf_model(folder), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], r=4)
                        ).save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path, is_trainable=first)
    reference.load_adapter(tmp_path, "other", is_trainable=second)
    ours = PeftModel.from_pretrained(load_pretrained(folder), tmp_path, is_trainable=first)
    ours.load_adapter(tmp_path, "other", is_trainable=second)
    assert trainable(ours) == trainable(reference)
    assert any(".other." in n for n in trainable(ours)) == second
    assert ours.active_adapter == reference.active_adapter == "default" and ours.training == reference.training


# -- 8. one adapter with trained biases at most -------------------------------------------------------------
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_second_adapter_with_trained_biases_is_refused_as_in_peft(folder, tmp_path, bias):
    reference = peft.get_peft_model(hf_model(folder), peft.LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        reference.add_adapter("b", peft.LoraConfig(target_modules=["v_proj"], bias=bias))
    ours = get_peft_model(load_pretrained(folder), LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError) as err:
        ours.add_adapter("b", LoraConfig(target_modules=["v_proj"], bias=bias))
    assert f"bias={bias!r}" in one_line(err) and "'default'" in str(err.value)
    assert list(ours.peft_config) == ["default"] and not any(".b." in k for k in ours.state_dict())
    ours.save_pretrained(tmp_path)
    edit_config(tmp_path, bias=bias)
    with pytest.raises(ValueError, match="only one adapter may train biases"):
        ours.load_adapter(tmp_path, "c")
    ours.add_adapter("d", LoraConfig(target_modules=["v_proj"]))  # bias="none" beside it is fine


# -- 9. LoraEmbedding sizes --------------------------------------------------------------------------------
def test_lora_embedding_has_peft_in_and_out_features():
    base = nn.Sequential(nn.Embedding(20, 8))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], r=2)).base_model.model[0]
    ours = get_peft_model(base, LoraConfig(target_modules=["0"], r=2)).model[0]
    assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features) == (20, 8)


# -- 10. lora_alpha = 0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, named", [(dict(lora_alpha=0), "lora_alpha=0"),
                                           (dict(alpha_pattern={"v_proj": 0.0}), "alpha_pattern['v_proj']=0.0")])
def test_a_zero_alpha_is_refused(kwargs, named):
    with pytest.raises(ValueError) as err:
        LoraConfig(target_modules=TARGETS, **kwargs)
    assert named in one_line(err) and "zero" in str(err.value)
    with pytest.raises(ValueError, match="zero"):
        LoraConfig.from_dict({"peft_type": "LORA", "target_modules": TARGETS, **kwargs})


# -- 11. adapter_model.bin -------------------------------------------------------------------------------
def test_a_peft_bin_adapter_loads_with_peft_logits(folder, tmp_path):
    reference = peft_adapter(folder, tmp_path / "a", safe=False, target_modules=["q_proj", "embed_tokens"])
    assert [p.name for p in (tmp_path / "a").glob("adapter_model.*")] == ["adapter_model.bin"]
    ours = PeftModel.from_pretrained(load_pretrained(folder), tmp_path / "a")
    assert_close(logits(ours), logits(reference))
    ours.load_adapter(tmp_path / "a", "again")
    ours.set_adapter("again")
    assert_close(logits(ours), logits(reference))


class Hostile:
    """Unpickling this calls os.mkdir(marker): any code torch.load's full unpickler would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_bin_holding_more_than_tensors_is_a_one_line_error_and_runs_nothing(folder, saved, tmp_path):
    adapter = copy_of(saved, tmp_path / "evil")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Hostile(marker)},
               adapter / "adapter_model.bin")
    for load in (lambda: PeftModel.from_pretrained(load_pretrained(folder), adapter), lambda: inspect_adapter(adapter)):
        with pytest.raises(ValueError) as err:
            load()
        message = one_line(err)
        assert str(adapter / "adapter_model.bin") in message and "more than tensors" in message
    assert not marker.exists()


# -- 12. adapter_config.json that is not JSON ------------------------------------------------------------
@pytest.mark.parametrize("text", ["{'r': 8,}", "", "[1, 2]"])
def test_an_adapter_config_that_is_not_a_json_object_is_a_one_line_error(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError) as err:
        read_adapter_config(tmp_path)
    assert str(tmp_path / "adapter_config.json") in one_line(err)


def test_prompt_encoders_on_a_bf16_base_keep_peft_dtypes(folder):
    """PEFT builds prompt encoders in fp32 whatever the base (no upcast needed): so do we."""
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    theirs = peft.get_peft_model(hf_model(folder, torch.bfloat16), peft.PromptTuningConfig(**config))
    ours = get_peft_model(load_pretrained(folder, dtype=torch.bfloat16), PromptTuningConfig(**config))
    prompt_dtypes = lambda model: {n: d for n, d in dtypes(model).items() if "prompt" in n}  # noqa: E731
    assert prompt_dtypes(ours) == prompt_dtypes(theirs) == {"prompt_encoder.default.embedding.weight": torch.float32}
