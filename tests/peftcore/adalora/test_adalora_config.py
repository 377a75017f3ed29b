"""AdaLoraConfig against HF PEFT 0.21.2's: field names and defaults, to_dict / from_dict, adapter_config.json both
ways, and every refusal with its one-line message (PEFT's own, or the failure PEFT reports later in training)."""
import dataclasses
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402

from peftcore import LoraConfig, PeftType, TaskType  # noqa: E402
from peftcore.adalora import AdaLoraConfig  # noqa: E402
from peftcore.adapter_io import config_from_dict, load_config  # noqa: E402
from peftcore.config import IGNORED_KEYS, INERT_PEFT_FIELDS, REFUSED_PEFT_FIELDS  # noqa: E402

BASE = dict(total_step=10, target_modules=["q_proj", "v_proj"])
NON_DEFAULT = dict(total_step=200, target_modules=["q_proj", "v_proj"], init_r=6, target_r=3, tinit=10, tfinal=20,
                   deltaT=5, beta1=0.8, beta2=0.9, orth_reg_weight=0.2, lora_alpha=16, lora_dropout=0.1,
                   task_type="CAUSAL_LM", rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True] * 5 + [False]})


def defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def test_fields_and_defaults_equal_peft(tmp_path):
    ours, theirs = defaults(AdaLoraConfig), defaults(peft.AdaLoraConfig)
    own = set(theirs) - set(defaults(peft.LoraConfig))  # what AdaLoRA adds to LoRA's fields
    assert own == {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                   "total_step"}
    assert {k: ours[k] for k in own | {"rank_pattern"}} == {k: theirs[k] for k in own | {"rank_pattern"}}
    assert ours["rank_pattern"] is None  # PEFT's AdaLoRA default, not LoRA's {}
    assert set(ours) <= set(theirs)
    assert {k: ours[k] for k in ours if k != "peft_type"} == {k: theirs[k] for k in ours if k != "peft_type"}
    # what PEFT has and we do not: exactly LoRA's fields peftcore leaves out, each known to the config tables
    assert set(theirs) - set(ours) == set(defaults(peft.LoraConfig)) - set(defaults(LoraConfig))
    peft.AdaLoraConfig(**BASE).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    unknown = set(written) - set(ours) - set(REFUSED_PEFT_FIELDS) - set(INERT_PEFT_FIELDS) - IGNORED_KEYS
    assert unknown == {"peft_type"}
    assert AdaLoraConfig.peft_type is PeftType.ADALORA and AdaLoraConfig(**BASE).peft_type.value == "ADALORA"
    assert isinstance(AdaLoraConfig(**BASE), LoraConfig)  # as PEFT's: methods.py looks AdaLoRA up first


def test_to_dict_from_dict_round_trip():
    config = AdaLoraConfig(**NON_DEFAULT)
    d = config.to_dict()
    assert d["peft_type"] == "ADALORA" and d["task_type"] == "CAUSAL_LM" and d["init_r"] == 6
    back = config_from_dict(json.loads(json.dumps(d)))
    assert type(back) is AdaLoraConfig and back == config
    assert back.task_type is TaskType.CAUSAL_LM


def test_a_peft_written_adapter_config_loads_as_ours_and_ours_loads_in_peft(tmp_path):
    theirs = peft.AdaLoraConfig(**NON_DEFAULT)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_config(tmp_path / "theirs")
    assert type(ours) is AdaLoraConfig
    for name in defaults(AdaLoraConfig):
        mine, expected = getattr(ours, name), getattr(theirs, name)
        if name == "target_modules":  # PEFT keeps a set
            mine, expected = set(mine), set(expected)
        assert mine == (expected.value if hasattr(expected, "value") else expected), name
    (tmp_path / "ours").mkdir()
    ours.save(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["inference_mode"] is True
    back = peft.AdaLoraConfig.from_pretrained(tmp_path / "ours")
    assert type(back) is peft.AdaLoraConfig
    for name in defaults(AdaLoraConfig):
        if name not in ("inference_mode", "target_modules"):
            assert getattr(back, name) == getattr(theirs, name), name
    assert back.target_modules == theirs.target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("overrides, peft_message, ours_message", [
    (dict(total_step=None), "does not work when `total_step` is None", r"total_step=None: AdaLoRA lays its rank "),
    (dict(total_step=0), "does not work when `total_step` is None", r"total_step=0: AdaLoRA lays its rank schedule"),
    (dict(tinit=6, tfinal=4), "don't allow for a budgeting phase", r"tinit=6 and tfinal=4 leave no steps of "
                                                                   r"total_step=10 for the budget to fall"),
    (dict(use_dora=True), "does not support DoRA", r"use_dora=True is not supported \(AdaLoRA has no DoRA form"),
    (dict(orth_reg_weight=-0.1), "should be greater than or equal to 0",
     r"orth_reg_weight must be >= 0, got -0.1"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}), "does not support LOFTQ",
     r"loftq_config is not supported \(as in HF PEFT\)"),
    (dict(target_modules="q_proj", layers_to_transform=[0]), "cannot be used when `target_modules` is a str",
     "cannot be used when target_modules is a str"),
])
def test_refusals_equal_peft_each_in_one_line(overrides, peft_message, ours_message):
    with pytest.raises(ValueError, match=peft_message):
        peft.AdaLoraConfig(**{**BASE, **overrides})
    with pytest.raises(ValueError, match=ours_message) as raised:
        AdaLoraConfig(**{**BASE, **overrides})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("overrides, ours_message", [
    (dict(beta1=1.0), r"beta1=1.0, beta2=0.85: EMA factors must lie in \(0, 1\)"),  # PEFT: assert in RankAllocator
    (dict(beta2=0.0), r"beta1=0.85, beta2=0.0: EMA factors must lie in \(0, 1\)"),
    (dict(target_r=13), r"need 0 < target_r <= init_r, got target_r=13, init_r=12"),  # PEFT: kthvalue error later
    (dict(deltaT=0), r"deltaT must be a positive number of steps, got 0"),  # PEFT: step % 0 at the first mask
])
def test_what_peft_only_fails_on_in_training_is_refused_at_once(overrides, ours_message):
    peft.AdaLoraConfig(**{**BASE, **overrides})  # PEFT's config takes it ...
    with pytest.raises(ValueError, match=ours_message) as raised:  # ... ours says what is wrong up front
        AdaLoraConfig(**{**BASE, **overrides})
    assert "\n" not in str(raised.value)


def test_peft_rank_allocator_asserts_on_the_betas_we_refuse():
    import torch

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    with pytest.raises(AssertionError):
        peft.get_peft_model(model, peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"], beta1=1.0))


def test_r_other_than_8_warns_as_peft_and_init_r_is_the_rank():
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        peft.AdaLoraConfig(**BASE, r=4)
    with pytest.warns(UserWarning, match=r"^AdaLoraConfig.r is not used by AdaLoRA and is ignored; the initial rank "
                                         r"is init_r$"):
        AdaLoraConfig(**BASE, r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig(**BASE)  # the default r: no warning


def test_lora_alpha_zero_is_accepted_as_peft_does(tmp_path):
    peft.AdaLoraConfig(**BASE, lora_alpha=0).save_pretrained(tmp_path)
    assert load_config(tmp_path).lora_alpha == 0
