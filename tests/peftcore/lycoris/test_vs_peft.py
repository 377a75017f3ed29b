"""LoHa / LoKr on nn.Linear against the installed HF PEFT (0.21.2), case by case.

Each case builds the same config in both libraries; PEFT's perturbed adapter is copied into ours (strict
load_state_dict: the keys are PEFT's key for key). Checked per case: outputs, the gradient of every adapter
tensor, trainable-parameter counts, merged == unmerged, merged weights == PEFT's merged weights, unmerge
restores W.
"""
import copy

import peft
import pytest
import torch

from tests.peftcore.lycoris.tiny import (
    METHODS,
    block,
    features,
    ours_state,
    pair,
    peft_adapter_params,
    peft_layers,
    tiny_llama,
    tokens,
)
from tests.tolerances import assert_close

ALL = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# case -> (method, model, config kwargs); the same kwargs go to PEFT's config and ours
CASES = {
    "loha_block": ("loha", "block", dict(target_modules=ALL, r=3, alpha=5)),
    "loha_patterns": ("loha", "block", dict(target_modules=ALL, r=2, rank_pattern={"up_proj": 5},
                                            alpha_pattern={"v_proj": 1.5})),
    "loha_llama_layers": ("loha", "llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                                layers_pattern="layers", r=2, alpha=4)),
    "loha_llama_all_linear_exclude": ("loha", "llama", dict(target_modules="all-linear", exclude_modules=["o_proj"],
                                                            r=2)),
    "lokr_full_w2": ("lokr", "block", dict(target_modules=ALL, r=8, alpha=3)),  # r >= max(w2 sides) / 2: lokr_w2
    "lokr_low_rank_w2": ("lokr", "block", dict(target_modules=["up_proj", "down_proj"], r=1)),  # w2_a @ w2_b
    "lokr_decompose_both": ("lokr", "block", dict(target_modules=ALL, r=1, decompose_both=True)),
    "lokr_decompose_factor": ("lokr", "block", dict(target_modules=ALL, r=2, decompose_factor=2, alpha=6)),
    "lokr_factor_not_dividing": ("lokr", "block", dict(target_modules=["up_proj"], r=2, decompose_factor=5)),
    "lokr_llama_regex": ("lokr", "llama", dict(target_modules=r".*\.1\.(self_attn\.k|mlp\.gate)_proj", r=2,
                                               rank_pattern={"gate_proj": 1})),
}
MODELS = {"block": block, "llama": tiny_llama}


def run(model, kind):
    if kind == "llama":
        return model(input_ids=tokens()).logits
    return model(features())


@pytest.fixture(params=sorted(CASES))
def case(request):
    method, kind, kwargs = CASES[request.param]
    theirs, ours, layers = pair(method, MODELS[kind](), **kwargs)
    return kind, theirs, ours, layers


def test_outputs_and_keys_equal_pefts(case):
    kind, theirs, ours, layers = case
    assert sorted(layers) == sorted(peft_layers(theirs))  # the same modules wrapped
    assert [k for k in theirs.state_dict()] == ["base_model.model." + k for k in ours.state_dict()]  # order too
    out = run(ours, kind)
    assert_close(out, run(theirs, kind))
    with theirs.disable_adapter():
        plain = run(theirs, kind)
    assert (out - plain).abs().max() > 1e-3  # the perturbed adapter changes the output: the check above can fail


def test_every_adapter_gradient_equals_pefts(case):
    kind, theirs, ours, layers = case
    run(theirs, kind).square().mean().backward()
    run(ours, kind).square().mean().backward()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    ours_params = {f"{name}.{attr}.{key}": p for name, layer in layers.items()
                   for attr in layer.PARAM_DICTS for key, p in getattr(layer, attr).items()}
    assert sorted(ours_params) == sorted(theirs_grads)  # PEFT trains exactly these tensors
    for key, p in ours_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, key
        assert_close(p.grad, theirs_grads[key])


def test_trainable_parameter_count_equals_pefts(case):
    _, theirs, ours, layers = case
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for layer in layers.values() for p in layer.adapter_params("default")) == trainable
    assert trainable == sum(p.numel() for p in peft_adapter_params(theirs))


def test_merge_equals_pefts_and_unmerge_restores(case):
    kind, theirs, ours, layers = case
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    unmerged = run(ours, kind)
    for layer in layers.values():
        layer.merge()
    theirs.merge_adapter()
    theirs_layers = peft_layers(theirs)
    for name, layer in layers.items():
        assert_close(layer.base_layer.weight, theirs_layers[name].base_layer.weight)
        assert_close(layer.base_layer.weight - before[name], layer.delta_weight("default"))
    assert_close(run(ours, kind), unmerged)
    for layer in layers.values():
        layer.unmerge()
        assert layer.merged_adapters == []
    for name, layer in layers.items():
        assert_close(layer.base_layer.weight, before[name])
    assert_close(run(ours, kind), unmerged)


INITS = [("loha", {}, torch.float32), ("lokr", {}, torch.float32),
         ("lokr", dict(init_weights="lycoris", r=1), torch.float32),
         ("lokr", dict(decompose_both=True, r=1), torch.float32),
         ("loha", dict(init_weights=False), torch.bfloat16),  # PEFT's fp32 init took a trip through bf16
         ("lokr", dict(init_weights=False, r=1), torch.bfloat16)]


@pytest.mark.parametrize("method, kwargs, dtype", INITS)
def test_default_init_is_the_identity_and_seeded_init_equals_pefts(method, kwargs, dtype):
    """init_weights=True / "lycoris": the adapter starts as the identity; with the same seed, ours draws PEFT's
    numbers bit for bit (same shapes, same draw order, same rounding through the base dtype)."""
    model = block().to(dtype)
    peft_cls, our_cls, inject = METHODS[method]
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cls(target_modules=ALL, **kwargs))
    ours = copy.deepcopy(model)
    torch.manual_seed(7)
    inject(ours, our_cls(target_modules=ALL, **kwargs), "default")
    theirs_state = ours_state(theirs)
    assert list(ours.state_dict()) == list(theirs_state)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=0, atol=0)
    x = features(dtype=dtype)
    if kwargs.get("init_weights", True):
        assert_close(ours(x), model(x))
    else:  # random init: not the identity
        assert (ours(x) - model(x)).abs().max() > 1e-3
