"""(IA)^3 layers: several adapters and mixed batches (against PEFT and per-adapter runs), half precision,
merge properties (hypothesis), the layer contract, and one-line errors for bad options."""
import copy
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peftcore.ia3 import IA3Config, IA3Conv, IA3Linear, inject_ia3
from peftcore.lora.layer import Adapter
from peftcore.models.layers import Conv1D
from peftcore.models.quantized import QuantLinear
from tests.peftcore.ia3.helpers import (
    PREFIX,
    TinyMLP,
    ia3_layers,
    our_keys,
    perturb,
    routed,
    set_active,
    tiny_mlp,
    twins,
)
from tests.tolerances import assert_close

FIRST = dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
SECOND = dict(target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"])


@pytest.fixture
def two_adapters():
    """PEFT's model and ours, each with adapters "default" (FIRST) and "other" (SECOND), both perturbed."""
    base = tiny_mlp()
    theirs, ours, _ = twins(base, **FIRST)
    theirs.add_adapter("other", peft.IA3Config(**copy.deepcopy(SECOND)))
    perturb(theirs, seed=7)
    inject_ia3(ours, IA3Config(**copy.deepcopy(SECOND)), "other")
    ours.load_state_dict(our_keys(theirs.state_dict()), strict=True)
    return base, theirs, ours


def test_several_active_adapters_multiply_as_in_peft(two_adapters):
    base, theirs, ours = two_adapters
    theirs.base_model.set_adapter(["default", "other"])
    set_active(ours, ["default", "other"])
    x = torch.randn(3, 5, 8)
    expected, got = theirs(x), ours(x)
    assert_close(got, expected)
    set_active(ours, ["default"])
    assert (ours(x) - got).abs().max() > 1e-3  # "other" takes part
    set_active(ours, ["default", "other"])
    weights = torch.randn_like(got)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, layer in ia3_layers(ours).items():
        for adapter in layer.ia3_l:
            assert_close(layer.ia3_l[adapter].grad, theirs_params[f"{PREFIX}{name}.ia3_l.{adapter}"].grad)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
        for layer in ia3_layers(ours).values():
            layer.merge()
        theirs_state = our_keys(theirs.state_dict())
        for key, value in ours.state_dict().items():
            assert_close(value, theirs_state[key])
        assert_close(ours(x), got.detach())


def test_mixed_batch_rows_equal_their_adapter_alone(two_adapters):
    base, theirs, ours = two_adapters
    x = torch.randn(4, 5, 8)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad(), routed(ours, names):
        mixed = ours(x)
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                expected = base(x[row:row + 1])
            else:
                theirs.set_adapter(name)
                expected = theirs(x[row:row + 1])
                set_active(ours, [name])
                assert_close(ours(x[row:row + 1]), expected)
            assert_close(mixed[row:row + 1], expected)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3  # the rows really took different adapters


def test_mixed_batch_on_a_convolution_routes_channels_per_row():
    layer = IA3Conv(nn.Conv2d(3, 4, 3, padding=1), is_feedforward=False)
    layer.add_adapter("a", IA3Config(init_ia3_weights=False))
    layer.add_adapter("b", IA3Config(init_ia3_weights=False))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        mixed = layer(x, adapter_names=["b", "a"])
        for row, name in enumerate(["b", "a"]):
            layer.active_adapters = [name]
            assert_close(mixed[row:row + 1], layer(x[row:row + 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_keeps_peft_dtypes(dtype, autocast):
    """autocast: float32 vectors on a half base (PEFT's autocast_adapter_dtype=True), else the base's dtype;
    either way the output is in the base dtype and equals PEFT's, and a merge keeps the weights' dtype."""
    base = tiny_mlp(dtype=dtype)
    theirs, ours, layers = twins(base, autocast=autocast, **FIRST)
    want = torch.float32 if autocast else dtype
    assert {layer.ia3_l["default"].dtype for layer in layers.values()} == {want}
    assert {p.dtype for n, p in theirs.named_parameters() if ".ia3_l." in n} == {want}
    x = torch.randn(3, 5, 8, dtype=dtype)
    with torch.no_grad():
        got = ours(x)
        assert got.dtype == dtype
        assert_close(got, theirs(x))
        for layer in layers.values():
            layer.merge()
        assert {layer.base_layer.weight.dtype for layer in layers.values()} == {dtype}
        assert_close(ours(x), got)


# -- merge properties -----------------------------------------------------------------------------
def make_layer(kind: str, n_in: int, n_out: int, bias: bool, feedforward: bool) -> IA3Linear:
    if kind == "conv1d":  # peftcore's GPT-2 Conv1D: weight stored (in, out), always a bias
        base = Conv1D(n_out, n_in)
        nn.init.normal_(base.weight), nn.init.normal_(base.bias)
    else:
        base = nn.Linear(n_in, n_out, bias=bias)
    return IA3Linear(base, feedforward)


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["linear", "conv1d"]), n_in=st.integers(1, 7), n_out=st.integers(1, 7),
       bias=st.booleans(), feedforward=st.booleans(), two=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_equals_unmerged_and_unmerge_restores(kind, n_in, n_out, bias, feedforward, two, seed):
    torch.manual_seed(seed)
    bias = bias or kind == "conv1d"
    layer = make_layer(kind, n_in, n_out, bias, feedforward)
    names = ["a", "b"] if two else ["a"]
    for name in names:
        layer.add_adapter(name, IA3Config(init_ia3_weights=False))
    layer.active_adapters = names
    x = torch.randn(4, n_in)
    with torch.no_grad():
        W = layer.base_layer.weight.T if kind == "conv1d" else layer.base_layer.weight  # (out, in)
        l_ = torch.stack([layer.ia3_l[n].flatten() for n in names]).prod(0)
        b = layer.base_layer.bias if bias else 0
        formula = (x * l_) @ W.T + b if feedforward else (x @ W.T + b) * l_
        unmerged = layer(x)
        assert_close(unmerged, formula)
        stored = layer.base_layer.weight.clone()
        bias_before = layer.base_layer.bias.clone() if bias else None
        delta = layer.delta_weight("a")
        layer.merge()
        assert layer.merged_adapters == names
        assert_close(layer(x), unmerged)
        if not two:
            assert_close(layer.base_layer.weight - stored, delta)
        layer.unmerge()
        assert layer.merged_adapters == []
        assert_close(layer.base_layer.weight, stored)
        if bias:
            assert_close(layer.base_layer.bias, bias_before)
        assert_close(layer(x), unmerged)


def test_layers_satisfy_the_adapter_protocol_and_bookkeeping():
    layer = IA3Linear(nn.Linear(4, 3), is_feedforward=True)
    layer.add_adapter("a", IA3Config())
    conv = IA3Conv(nn.Conv3d(2, 3, 1), is_feedforward=False)
    conv.add_adapter("a", IA3Config())
    assert isinstance(layer, Adapter) and isinstance(conv, Adapter)
    assert [p.shape for p in layer.adapter_params("a")] == [torch.Size([1, 4])]  # (1, in): scales the input
    assert [p.shape for p in conv.adapter_params("a")] == [torch.Size([1, 3, 1, 1, 1])]
    assert list(layer.state_dict()) == ["base_layer.weight", "base_layer.bias", "ia3_l.a"]  # PEFT's order
    x = torch.randn(2, 4)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")
    layer.disable_adapters = True
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    layer.disable_adapters = False
    with pytest.raises(RuntimeError, match="mixed-adapter batch"):
        layer(x, adapter_names=["a", "a"])
    layer.unmerge()
    layer.delete_adapter("a")
    assert list(layer.ia3_l) == [] and layer.active_adapters == []
    assert torch.equal(layer(x), layer.base_layer(x))


def test_quantized_base_runs_but_refuses_to_merge():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = IA3Linear(QuantLinear.from_linear(dense, "int8"), is_feedforward=False)
    layer.add_adapter("a", IA3Config(init_ia3_weights=False))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close(layer(x), layer.base_layer(x) * layer.ia3_l["a"].flatten())
    with pytest.raises(TypeError, match="quantized") as err:
        layer.merge()
    assert "\n" not in str(err.value) and layer.merged_adapters == []
    layer.unmerge()  # what the backend calls on every layer: nothing merged, nothing to do


def test_a_later_adapter_follows_the_layers_feedforward_kind():
    model = tiny_mlp()
    inject_ia3(model, IA3Config(**FIRST), "a")
    with pytest.warns(UserWarning, match="follows it"):
        inject_ia3(model, IA3Config(target_modules=["down_proj"], feedforward_modules=[]), "b")
    layer = model.layers[0].down_proj
    assert layer.ia3_l["b"].shape == layer.ia3_l["a"].shape == (1, 12)


# -- errors ---------------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_feedforward_outside_targets_is_refused_like_peft():
    kwargs = dict(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(**kwargs)
    with pytest.raises(ValueError, match="subset") as err:
        IA3Config(**kwargs)
    assert "['down_proj']" in one_line(err)
    IA3Config(target_modules=["q_proj"], feedforward_modules=".*down_proj")  # a regex is not compared, as in PEFT


class WithOthers(TinyMLP):
    def __init__(self):
        super().__init__()
        self.embed, self.conv1d = nn.Embedding(5, 8), nn.Conv1d(2, 2, 1)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(target_modules=["qproj"], feedforward_modules=[]), ValueError, ["q_proj", "down_proj", "Candidates"]),
    (dict(target_modules="q_proj", feedforward_modules=[]), ValueError, ["regex", "layers.0.q_proj"]),
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"], feedforward_modules=[]), ValueError,
     ["exclude_modules"]),
    (dict(target_modules=["q_proj"]), ValueError, ["feedforward_modules is required", "WithOthers"]),
    (dict(feedforward_modules=[]), ValueError, ["target_modules is required", "llama"]),
    (dict(target_modules=["embed", "q_proj"], feedforward_modules=[]), TypeError, ["'embed'", "Embedding"]),
    (dict(target_modules=["conv1d"], feedforward_modules=[]), TypeError, ["Conv1d", "nn.Conv2d"]),
])
def test_bad_options_are_one_line_errors(kwargs, error, words):
    model = WithOthers()
    before = [type(m) for m in model.modules()]
    with pytest.raises(error) as err:
        inject_ia3(model, IA3Config(**kwargs), "default")
    message = one_line(err)
    assert all(w in message for w in words), message
    assert [type(m) for m in model.modules()] == before  # checked before anything was swapped


def test_a_module_of_another_adapter_method_is_refused():
    from peftcore.config import LoraConfig
    from peftcore.lora.inject import inject_lora

    model = tiny_mlp()
    inject_lora(model, LoraConfig(target_modules=["q_proj"], r=2), "lora")
    with pytest.raises(TypeError, match="another adapter") as err:
        inject_ia3(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "ia3")
    one_line(err)


def test_mixed_batch_of_the_wrong_length_is_refused():
    layer = IA3Linear(nn.Linear(4, 3))
    layer.add_adapter("a", IA3Config())
    with pytest.raises(ValueError, match="3 entries for a batch of 2") as err:
        layer(torch.randn(2, 4), adapter_names=["a", "a", "a"])
    one_line(err)


@pytest.mark.parametrize("feedforward", [True, False])
def test_conv3d_layer_equals_peft_layer(feedforward):
    torch.manual_seed(0)
    base = nn.Conv3d(4, 6, 2, groups=2)
    theirs = peft.tuners.ia3.Conv3d(copy.deepcopy(base), "default", config=peft.IA3Config(
        target_modules=["c"], feedforward_modules=["c"] if feedforward else []), is_feedforward=feedforward)
    perturb(theirs)
    ours = IA3Conv(copy.deepcopy(base), feedforward)
    ours.add_adapter("default", IA3Config())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 4, 3, 3, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(ours(x), theirs(x))
        assert (ours(x) - base(x)).abs().max() > 1e-3
        theirs.merge(), ours.merge()
        assert_close(ours.base_layer.weight, theirs.base_layer.weight)
        assert_close(ours.base_layer.bias, theirs.base_layer.bias)


def test_merge_warns_about_zero_entries_and_a_needless_unmerge_is_silent():
    layer = IA3Linear(nn.Linear(4, 3))
    layer.add_adapter("a", IA3Config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.unmerge()  # nothing merged: nothing to say
    with torch.no_grad():
        layer.ia3_l["a"][1] = 0
    with pytest.warns(UserWarning, match="zero entries"):
        layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(["a"])
