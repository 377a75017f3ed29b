"""LoHaConfig / LoKrConfig against PEFT's (fields, defaults, saved JSON both ways), LoKr's factorization rule
as a property against PEFT's, and the one-line errors for bad options and bad targets."""
import copy
import dataclasses
import json

import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

from peftcore.config import LoraConfig, PeftConfig
from peftcore.lora.inject import inject_lora
from peftcore.lycoris import LoHaConfig, LoKrConfig, LoKrLayer, factorization, inject_loha, inject_lokr
from tests.peftcore.lycoris.tiny import METHODS, block, features, tiny_llama

BASE_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}


def defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fields_and_defaults_are_pefts(method):
    peft_cls, our_cls, _ = METHODS[method]
    ours, theirs = defaults(our_cls), defaults(peft_cls)
    assert {k: theirs[k] for k in ours} == ours  # every field of ours is PEFT's, with PEFT's default
    # PEFT's fields we lack are its metadata, which PeftConfig.to_dict writes and from_dict ignores
    assert set(theirs) - set(ours) == {"peft_type", "auto_mapping", "peft_version"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_saved_configs_load_both_ways(method, tmp_path):
    peft_cls, our_cls, _ = METHODS[method]
    kwargs = dict(r=4, alpha=2.5, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                  module_dropout=0.1, layers_to_transform=[0], layers_pattern="layers")
    if method == "lokr":
        kwargs.update(decompose_both=True, decompose_factor=4, init_weights="lycoris")
    peft_cls(**kwargs).save_pretrained(tmp_path)
    loaded = our_cls.from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    # PEFT keeps target_modules as a set, so its JSON lists them in hash order
    assert dataclasses.replace(loaded, target_modules=sorted(loaded.target_modules)) == our_cls(**kwargs)
    ours = our_cls(**kwargs).to_dict()
    assert ours["peft_type"] == method.upper()
    theirs = peft_cls(**{k: v for k, v in ours.items() if k not in ("peft_type", "peft_version")})
    assert theirs.to_dict() == peft_cls(**kwargs).to_dict()


@settings(max_examples=10, deadline=None)
@given(dimension=st.integers(1, 3000), factor=st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64, -2]))
def test_factorization_equals_pefts(dimension, factor):
    m, n = factorization(dimension, factor)
    assert (m, n) == peft_factorization(dimension, factor)
    assert m * n == dimension


def test_factorization_documented_values():
    """The docstring's examples, and the unsorted pair of an exact divisor (as PEFT returns it)."""
    assert [factorization(256), factorization(128), factorization(127), factorization(128, 4),
            factorization(128, 3), factorization(128, 64)] == [(16, 16), (8, 16), (1, 127), (4, 32), (2, 64), (64, 2)]


BAD_CONFIGS = [
    (LoHaConfig, dict(r=0), "positive integer"),
    (LoKrConfig, dict(rank_pattern={"q_proj": -1}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (LoHaConfig, dict(alpha=0), "scales the update by zero"),
    (LoKrConfig, dict(alpha_pattern={"v_proj": 0}), "alpha_pattern"),
    (LoKrConfig, dict(rank_dropout=1.5), r"rank_dropout is a probability"),
    (LoHaConfig, dict(module_dropout=-0.1), r"module_dropout is a probability"),
    (LoHaConfig, dict(layers_pattern="layers"), "only applies together with layers_to_transform"),
    (LoHaConfig, dict(init_weights="lycoris"), "must be True .* or False"),
    (LoKrConfig, dict(init_weights="gaussian"), "True, False or 'lycoris'"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_CONFIGS)
def test_bad_options_are_one_line_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)


def test_layers_to_transform_with_a_regex_warns_and_is_ignored_as_in_peft():
    with pytest.warns(UserWarning, match="ignored when target_modules is a regex"):
        config = LoHaConfig(target_modules=r".*q_proj", layers_to_transform=[5])
    assert list(inject_loha(block(), config, "default")) == ["q_proj"]


class HfConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = transformers.pytorch_utils.Conv1D(12, 12)


def lora_wrapped():
    model = block()
    inject_lora(model, LoraConfig(target_modules=["q_proj"]), "default")
    return model


def reflect_conv():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"))


BAD_TARGETS = [  # (model, config kwargs, error type, message)
    (block, dict(target_modules=None), ValueError, "target_modules is required"),
    (block, dict(target_modules=["q_prj"]), ValueError,
     r"matched no module of Block\. Candidates: down_proj, k_proj, q_proj, up_proj, v_proj$"),
    (tiny_llama, dict(target_modules="q_proj|v_proj"), ValueError, "regex that must match a whole module name"),
    (block, dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), ValueError, "matched no module"),
    (HfConv1D, dict(target_modules=["c_attn"]), TypeError, "GPT-2's Conv1D, which .* does not adapt"),
    (lambda: nn.Sequential(nn.Embedding(5, 4)), dict(target_modules=["0"]), TypeError, "is a Embedding"),
    (reflect_conv, dict(target_modules=["0"]), ValueError, "padding_mode='reflect'"),
    (lora_wrapped, dict(target_modules=["q_proj", "k_proj"]), TypeError, "already a LoraLinear"),
]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("make, kwargs, error, message", BAD_TARGETS)
def test_bad_targets_are_one_line_errors_and_wrap_nothing(method, make, kwargs, error, message):
    _, our_cls, inject = METHODS[method]
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message) as info:
        inject(model, our_cls(**kwargs), "default")
    assert "\n" not in str(info.value)
    assert list(model.state_dict()) == list(before)  # checked before anything was wrapped


def test_peft_refuses_gpt2_conv1d_too():
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(HfConv1D(), peft.LoKrConfig(target_modules=["c_attn"]))


def test_runtime_misuse_is_one_line_errors():
    model = block()
    layer = inject_lokr(model, LoKrConfig(target_modules=["q_proj"], init_weights=False), "default")["q_proj"]
    x = features(batch=2)
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2"):
        layer(x, adapter_names=["default"] * 3)
    layer.merge()
    layer.disable_adapters = True
    with pytest.raises(RuntimeError, match="unmerge before disabling"):
        layer(x)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(["default"])


def test_a_second_adapter_lands_in_the_existing_layer():
    model = block()
    first = inject_lokr(model, LoKrConfig(target_modules=["q_proj", "k_proj"]), "default")
    second = inject_lokr(model, LoKrConfig(target_modules="all-linear", r=1), "other")
    assert sorted(second) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert second["q_proj"] is first["q_proj"] and isinstance(model.q_proj, LoKrLayer)
    assert set(model.q_proj.r) == {"default", "other"} and model.q_proj.r["other"] == 1
    assert not [k for k in model.state_dict() if ".base_layer.base_layer." in k]
    assert torch.equal(model.q_proj.base_layer.weight, block().q_proj.weight)
