"""(IA)^3 against the installed HF PEFT: the same IA3Config wrapped by peft.get_peft_model and by inject_ia3.

PEFT's vectors are perturbed off their ones-init and loaded into ours with load_state_dict(strict=True), which
fails unless the state-dict keys (and shapes) are equal key for key. Per case: the resolved targets, the keys,
parameter counts, outputs, the gradient of every vector, merged weights, merge == unmerged, unmerge == W, and
the ones-init leaving the base output bit for bit.
"""
import copy
import warnings

import peft
import pytest
import torch

from peftcore.ia3 import IA3Config, inject_ia3
from tests.peftcore.ia3.helpers import TinyConv, our_keys, tiny_gpt2, tiny_llama, tiny_mlp, twins
from tests.tolerances import assert_close

MLP_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
# case -> (model builder, IA3Config kwargs); the same kwargs go to peft.IA3Config and ours
CASES = {
    "mlp_output_and_feedforward": (tiny_mlp, dict(target_modules=MLP_TARGETS, feedforward_modules=["down_proj"])),
    "mlp_regex_exclude": (tiny_mlp, dict(target_modules=r".*\.(q|v|up)_proj", exclude_modules=["layers.0.v_proj"],
                                         feedforward_modules=r".*up_proj")),
    "mlp_all_linear": (tiny_mlp, dict(target_modules="all-linear", feedforward_modules=["up_proj", "down_proj"])),
    "llama_model_type_defaults": (tiny_llama, dict()),  # PEFT's llama defaults: k, v, down (feedforward)
    "llama_all_linear_bare_suffix_feedforward": (tiny_llama, dict(target_modules="all-linear",
                                                                  feedforward_modules=["_proj"])),
    "gpt2_conv1d_defaults": (tiny_gpt2, dict(fan_in_fan_out=True)),  # c_attn, mlp.c_proj (feedforward)
    "conv2d_grouped_feedforward": (TinyConv, dict(target_modules=["conv_in", "conv_mid", "conv_out"],
                                                  feedforward_modules=["conv_mid"])),
}


def inputs(model):
    torch.manual_seed(5)
    if isinstance(model, TinyConv):
        return torch.randn(2, 3, 6, 6)
    if hasattr(model, "config"):
        return torch.randint(0, 61, (2, 7))
    return torch.randn(3, 5, 8)


def run(model, x):
    out = model(input_ids=x) if x.dtype == torch.long else model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    build, kwargs = CASES[request.param]
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrections, PEFT's unmerge caveat
        theirs, ours, layers = twins(base, **kwargs)
    return request.param, base, theirs, ours, layers, kwargs


def test_targets_keys_and_parameter_counts_equal_peft(case):
    name, base, theirs, ours, layers, kwargs = case
    resolved = theirs.peft_config["default"]
    ours_config = IA3Config(**copy.deepcopy(kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_ia3(copy.deepcopy(base), ours_config, "default")
    assert set(ours_config.target_modules) == set(resolved.target_modules)
    assert ours_config.fan_in_fan_out == resolved.fan_in_fan_out
    theirs_keys = list(our_keys(theirs.state_dict()))
    assert list(ours.state_dict()) == theirs_keys  # the same keys, in the same order
    assert {k for k in theirs_keys if ".ia3_l." in k} == {f"{n}.ia3_l.default" for n in layers}
    trainable, total = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for layer in layers.values() for p in layer.adapter_params("default")) == trainable
    assert sum(p.numel() for p in ours.parameters()) == total
    feedforward = {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    assert {n for n, layer in layers.items() if layer.is_feedforward} == {n.removeprefix("base_model.model.")
                                                                          for n in feedforward}


def test_outputs_and_every_vector_gradient_equal_peft(case):
    name, base, theirs, ours, layers, _ = case
    x = inputs(base)
    expected, got = run(theirs, x), run(ours, x)
    assert_close(got, expected)
    assert (got - run(base, x)).abs().max() > 1e-3  # the perturbed vectors act: the comparison can fail
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    theirs_grads = {k.removeprefix("base_model.model."): p.grad for k, p in theirs.named_parameters()
                    if ".ia3_l." in k}
    ours_grads = {f"{n}.ia3_l.default": layer.ia3_l["default"].grad for n, layer in layers.items()}
    assert theirs_grads.keys() == ours_grads.keys()
    for key, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        assert_close(grad, theirs_grads[key])


def test_merge_equals_peft_merge_and_unmerge_restores_the_weights(case):
    name, base, theirs, ours, layers, _ = case
    x = inputs(base)
    with torch.no_grad():
        unmerged = run(ours, x)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        deltas = {n: layer.delta_weight("default") for n, layer in layers.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.merge_adapter()
        for layer in layers.values():
            layer.merge()
        theirs_state = our_keys(theirs.state_dict())
        for key, value in ours.state_dict().items():
            assert_close(value, theirs_state[key])
        for n, layer in layers.items():
            assert layer.merged_adapters == ["default"]
            assert_close(layer.base_layer.weight - before[f"{n}.base_layer.weight"], deltas[n])
        assert_close(run(ours, x), unmerged)
        for layer in layers.values():
            layer.unmerge()
        for key, value in ours.state_dict().items():
            assert_close(value, before[key])
        assert_close(run(ours, x), unmerged)


def test_ones_init_leaves_the_base_output_bit_for_bit(case):
    name, base, _, _, _, kwargs = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kwargs)))
        ours = copy.deepcopy(base)  # our own init, not PEFT's state loaded
        layers = inject_ia3(ours, IA3Config(**copy.deepcopy(kwargs)), "default")
    x = inputs(base)
    with torch.no_grad():
        assert torch.equal(run(ours, x), run(base, x))
        assert torch.equal(run(theirs, x), run(base, x))
    assert all(torch.equal(layer.ia3_l["default"], torch.ones_like(layer.ia3_l["default"]))
               for layer in layers.values())


def test_random_init_draws_what_peft_draws():
    """init_ia3_weights=False: N(0, 1) vectors; from one seed both libraries draw the same ones (same order,
    same shapes). tiny_mlp seeds itself, so both draws start from the same state."""
    kwargs = dict(target_modules=MLP_TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False)
    theirs = peft.get_peft_model(tiny_mlp(), peft.IA3Config(**copy.deepcopy(kwargs)))
    ours = tiny_mlp()
    inject_ia3(ours, IA3Config(**kwargs), "default")
    theirs_state = our_keys(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[key]), key
    assert ours.state_dict()["layers.0.q_proj.ia3_l.default"].std() > 0.3
