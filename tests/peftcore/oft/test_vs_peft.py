"""OFT against the installed HF PEFT on a tiny attention block and a tiny Llama: state-dict keys, outputs, every
adapter gradient, trainable counts, merged weights, init, half precision. PEFT's vectors are perturbed before they
are copied into ours, so a vector read from the wrong place (or a transposed rotation) changes the outputs."""
import copy
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.lora_backend import activate
from peftcore.oft import OFTConfig, inject_oft
from tests.peftcore.oft.common import block, ids, merge_all, oft_layers, pair, peft_layers, tiny_llama, unmerge_all
from tests.tolerances import assert_close

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"]
CASES = {
    "neumann_default": dict(target_modules=TARGETS, oft_block_size=4),
    "exact_cayley_r": dict(target_modules=TARGETS, r=2, oft_block_size=0, use_cayley_neumann=False),
    "block_share": dict(target_modules=TARGETS, oft_block_size=8, block_share=True),
    "coft": dict(target_modules=TARGETS, oft_block_size=4, coft=True, eps=0.05),
    "three_neumann_terms": dict(target_modules=TARGETS, oft_block_size=8, num_cayley_neumann_terms=3),
    "regex": dict(target_modules=r".*(q|down)_proj", oft_block_size=4),
}


@pytest.mark.parametrize("case", CASES)
def test_outputs_keys_and_gradients_equal_peft(case):
    base = block()
    theirs, ours = pair(base, **CASES[case])
    assert list(ours.state_dict()) == list(theirs.base_model.model.state_dict())  # key for key, in order
    assert any(".oft_R.default.weight" in k for k in ours.state_dict())
    x = ids()
    out_theirs, out_ours = theirs(x), ours(x)
    assert_close(out_ours, out_theirs)
    assert (out_ours - base(x)).abs().max() > 1e-2  # non-trivial: the rotations do change the output
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    grads_theirs = {n.removeprefix("base_model.model."): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if ".oft_" in n}
    assert sorted(grads_ours) == sorted(grads_theirs) and grads_ours
    for name, grad in grads_ours.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert_close(grad, grads_theirs[name], atol=1e-4, rtol=1e-4)
    if CASES[case].get("coft"):  # the projection is a state: both stored the same projected vectors
        for name, p in ours.named_parameters():
            if ".oft_" in name:
                assert_close(p, theirs.base_model.model.get_parameter(name))


@pytest.mark.parametrize("case", ["neumann_default", "exact_cayley_r", "block_share", "coft"])
def test_merge_equals_peft_and_unmerge_restores(case):
    base = block()
    theirs, ours = pair(base, **CASES[case])
    x = ids()
    unmerged = ours(x)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    merge_all(ours)
    theirs.merge_adapter()
    assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-4)  # merged == unmerged
    for name, layer in oft_layers(ours).items():  # the merged weights are PEFT's merged weights
        assert_close(layer.base_layer.weight, peft_layers(theirs)[name].base_layer.weight)
        assert layer.merged_adapters == ["default"]
    unmerge_all(ours)
    for name, p in ours.named_parameters():
        if "base_layer" in name:
            assert_close(p, before[name], atol=1e-5, rtol=1e-4)
    assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-4)


def test_delta_weight_is_the_merged_weight_minus_the_base():
    theirs, ours = pair(block(), **CASES["neumann_default"])
    layers = oft_layers(ours)
    deltas = {name: layer.delta_weight("default") for name, layer in layers.items()}
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    merge_all(ours)
    for name, layer in layers.items():
        assert_close(originals[name] + deltas[name], layer.base_layer.weight)
        assert deltas[name].abs().max() > 1e-3
        # the rotation itself is PEFT's get_delta_weight
        assert_close(layer.rotation_matrix("default"), peft_layers(theirs)[name].get_delta_weight("default"))


@pytest.mark.parametrize("bias", ["none", "all", "oft_only"])
def test_trainable_parameter_counts_equal_peft(bias):
    base = block()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(target_modules=TARGETS, oft_block_size=4,
                                                                    bias=bias))
    ours = copy.deepcopy(base)
    config = OFTConfig(target_modules=TARGETS, oft_block_size=4, bias=bias)
    layers = inject_oft(ours, config, "default")
    ours.requires_grad_(False)
    activate(ours, ["default"], {"default": config})  # what PeftModel runs for every method
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in ours.named_parameters() if n in trainable) == \
        theirs.get_nb_trainable_parameters()[0]
    adapter_count = sum(p.numel() for layer in layers.values() for p in layer.adapter_params("default"))
    # blocks * b(b-1)/2 per layer: five 16-wide inputs -> 4 blocks of 4 (6 each); down_proj's 24 -> 6 blocks
    assert adapter_count == 5 * (4 * 6) + 6 * 6


def test_default_init_is_the_identity_and_random_init_is_not():
    base, x = block(), ids()
    model = copy.deepcopy(base)
    inject_oft(model, OFTConfig(target_modules=TARGETS, oft_block_size=4), "default")
    assert_close(model(x), base(x))  # zero vectors: R = I exactly
    torch.manual_seed(3)
    random = copy.deepcopy(base)
    inject_oft(random, OFTConfig(target_modules=TARGETS, oft_block_size=4, init_weights=False), "default")
    assert (random(x) - base(x)).abs().max() > 1e-2
    std = torch.cat([p.flatten() for n, p in random.named_parameters() if ".oft_" in n]).std()
    assert 0.07 < std < 0.13  # PEFT's N(0, 0.1)


def test_block_size_that_does_not_divide_is_adjusted_as_peft():
    """16 inputs, oft_block_size=5: PEFT moves it to the nearest divisor (4, the lower on a tie) with a warning."""
    base = block()
    kwargs = dict(target_modules=["q_proj", "up_proj", "down_proj"], oft_block_size=5)
    with pytest.warns(UserWarning, match="Invalid"):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kwargs))
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="Adjusted"):
        inject_oft(ours, OFTConfig(**kwargs), "default")
    for name, layer in oft_layers(ours).items():
        assert layer.oft_block_size == peft_layers(theirs)[name].oft_block_size
        assert layer.r == peft_layers(theirs)[name].r
    assert oft_layers(ours)["down_proj"].oft_block_size["default"] == 4  # 24 inputs: 4 and 6 tie at 1 -> 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base(dtype, autocast):
    """autocast_adapter_dtype=True: fp32 vectors on a half base (PEFT's default); False: the base's dtype."""
    base = block(dtype=dtype)
    theirs, ours = pair(base, autocast=autocast, target_modules=TARGETS, oft_block_size=4)
    expected = torch.float32 if autocast else dtype
    vectors = [p for n, p in ours.named_parameters() if ".oft_" in n]
    assert vectors and all(p.dtype == expected for p in vectors)
    assert all(p.dtype == expected for n, p in theirs.named_parameters() if ".oft_" in n)
    x = ids()
    out = ours(x)
    assert out.dtype == dtype
    assert_close(out, theirs(x))
    merge_all(ours)
    theirs.merge_adapter()
    for name, layer in oft_layers(ours).items():
        assert layer.base_layer.weight.dtype == dtype
        assert_close(layer.base_layer.weight, peft_layers(theirs)[name].base_layer.weight)


LLAMA_CASES = {
    "attention_mlp": dict(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8),
    "all_linear": dict(target_modules="all-linear", oft_block_size=8),
    "layers_to_transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers",
                                oft_block_size=4),
    "exclude_embedding": dict(target_modules=["embed_tokens", "o_proj", "k_proj"], exclude_modules=r".*\.0\..*",
                              r=4, oft_block_size=0, use_cayley_neumann=False),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_tiny_llama_equals_peft(case):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own warnings about the random config
        theirs, ours = pair(base, **LLAMA_CASES[case])
    assert sorted(oft_layers(ours)) == sorted(peft_layers(theirs))
    x = ids(2, 6)
    logits = ours(x).logits
    assert_close(logits, theirs(x).logits)
    assert (logits - base(x).logits).abs().max() > 1e-3
    merge_all(ours)
    assert_close(ours(x).logits, logits, atol=1e-4, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(block_size=st.sampled_from([2, 4, 8]), share=st.booleans(), neumann=st.booleans(),
       terms=st.integers(2, 7), coft=st.booleans())
def test_property_any_layout_equals_peft_and_merges_exactly(block_size, share, neumann, terms, coft):
    """Over drawn block layouts and parameterisations: output == PEFT's, and merged == unmerged."""
    theirs, ours = pair(block(), target_modules=["q_proj", "up_proj", "down_proj"], oft_block_size=block_size,
                        block_share=share, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms, coft=coft,
                        eps=0.1)
    x = ids(2, 4)
    out = ours(x)
    assert_close(out, theirs(x), atol=1e-5, rtol=1e-4)
    merge_all(ours)
    assert_close(ours(x), out, atol=1e-5, rtol=1e-4)
