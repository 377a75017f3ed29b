"""OFTConfig: PEFT 0.21.2's fields and defaults; the options it refuses, and injection's errors, each one line."""
import copy
import dataclasses

import peft
import pytest
from torch import nn

from peftcore.config import PeftConfig
from peftcore.models.layers import Conv1D
from peftcore.oft import OFTConfig, inject_oft
from tests.peftcore.oft.common import block


def test_fields_and_defaults_equal_peft():
    theirs = {f.name: f.default for f in dataclasses.fields(peft.OFTConfig)}
    theirs = {k: v for k, v in theirs.items() if k not in {f.name for f in dataclasses.fields(peft.PeftConfig)}}
    ours = {f.name: f.default for f in dataclasses.fields(OFTConfig)}
    ours = {k: v for k, v in ours.items() if k not in {f.name for f in dataclasses.fields(PeftConfig)}}
    assert ours == theirs
    assert OFTConfig().to_dict()["peft_type"] == "OFT"


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=4, oft_block_size=8), "set only one of r"),
    (dict(r=0, oft_block_size=0), "must be nonzero"),
    (dict(r=-2, oft_block_size=0), "must not be negative"),
    (dict(bias="lora_only"), "bias must be"),
    (dict(layers_pattern="layers"), "layers_pattern only applies"),
    (dict(num_cayley_neumann_terms=1), "change nothing"),
    (dict(coft=True, eps=0.0), "positive eps"),
    (dict(init_weights="gaussian"), "init_weights must be"),
    (dict(module_dropout=1.0), r"module_dropout must be in \[0, 1\)"),
])
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        OFTConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_options_peft_accepts_but_that_do_nothing_warn():
    with pytest.warns(UserWarning, match="never applies it"):
        OFTConfig(module_dropout=0.1)
    with pytest.warns(UserWarning, match="ignored when target_modules is a str"):
        OFTConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def one_line_error(exc_type, fn, match):
    with pytest.raises(exc_type, match=match) as error:
        fn()
    assert "\n" not in str(error.value)


def test_unmatched_target_lists_candidates():
    one_line_error(ValueError, lambda: inject_oft(block(), OFTConfig(target_modules=["q_prj"]), "default"),
                   r"matched no module of Block\. Candidates: down_proj, embed_tokens, k_proj, q_proj, up_proj, v_proj")
    one_line_error(ValueError, lambda: inject_oft(block(), OFTConfig(target_modules=r"attn\.q_proj"), "default"),
                   "is a regex that must match a whole module name")
    one_line_error(ValueError, lambda: inject_oft(block(), OFTConfig(), "default"), "target_modules is required")


class WithConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.conv, self.norm = Conv1D(12, 8), nn.Conv2d(3, 4, 3), nn.LayerNorm(8)


@pytest.mark.parametrize("target, match", [("c_attn", "GPT-2's Conv1D"), ("conv", "nn.Conv2d is not supported"),
                                           ("norm", "is a LayerNorm; OFT adapts nn.Linear")])
def test_unsupported_layers_are_refused_before_anything_changes(target, match):
    model = WithConvs()
    one_line_error(TypeError, lambda: inject_oft(model, OFTConfig(target_modules=[target]), "default"), match)
    assert isinstance(getattr(model, target), (Conv1D, nn.Conv2d, nn.LayerNorm))  # left as it was


def test_fan_in_fan_out_on_linear_is_reset_with_peft_warning():
    config = OFTConfig(target_modules=["q_proj"], oft_block_size=4, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="setting it to False"):
        inject_oft(block(), config, "default")
    assert config.fan_in_fan_out is False


def test_second_adapter_joins_the_existing_layers():
    model = block()
    first = inject_oft(model, OFTConfig(target_modules=["q_proj", "embed_tokens"], oft_block_size=4), "a")
    second = inject_oft(model, OFTConfig(target_modules="all-linear", oft_block_size=8), "b")
    assert first["q_proj"] is second["q_proj"] and sorted(second["q_proj"].oft_R) == ["a", "b"]
    assert sorted(second) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert not any("base_layer.base_layer" in n for n in copy.deepcopy(model).state_dict())


def test_the_conv2d_refusal_reason_holds_in_peft():
    """Why nn.Conv2d is refused: PEFT's OFT Conv2d at identity init does not give the base conv (3x3 kernel)."""
    import torch

    model = WithConvs()
    x = torch.randn(1, 3, 6, 6)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(target_modules=["conv"], r=3, oft_block_size=0))
    assert (theirs.base_model.model.conv(x) - model.conv(x)).abs().max() > 0.1
