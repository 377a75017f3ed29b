"""add_weighted_adapter against HF PEFT's, on a tiny user module with an Embedding, nn.Linears and GPT-2's Conv1D.

The same model is built in both libraries (transformers' Conv1D there, ours here, same weights), with three
random adapters (init_lora_weights=False: A and B both non-zero) copied across key for key. For every
combination type the new adapter's tensors, the output with it active and its config's r / alpha / targets must
equal PEFT's. DARE draws with torch.bernoulli: torch is seeded identically before both calls, and the draws are
made in PEFT's order and shapes, so the results are equal, not just alike.
"""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft.tuners.lora.layer import Conv2d as PeftConv2d  # noqa: E402
from peft.tuners.lora.model import LoraModel as PeftLoraModel  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D as HFConv1D  # noqa: E402

from peftcore import LoraConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from peftcore.lora.registry import LORA_LAYERS  # noqa: E402
from peftcore.lora.weighted import (  # noqa: E402
    COMBINATION_TYPES,
    FACTORED_TYPES,
    WeightedMerge,
    add_weighted_adapter,
    fitted_factors,
    merge_tensors,
)
from peftcore.models import Conv1D, from_config  # noqa: E402
from peftcore.models.llama import LlamaConfig  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

VOCAB = 13
# the new adapter's injection warns, as PEFT's does, that one config's fan_in_fan_out is set per layer type
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


class Tiny(nn.Module):
    """embed (13 x 8) -> q (8 -> 8) -> v (8 -> 6) -> fc (a GPT-2 Conv1D, 6 -> 8) -> head (8 -> 13)."""

    def __init__(self, conv1d=Conv1D):
        super().__init__()
        self.embed, self.q, self.v = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, 6)
        self.fc, self.head = conv1d(8, 6), nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = torch.tanh(self.q(self.embed(ids)))
        return self.head(self.fc(torch.tanh(self.v(h))))


# x and y share a rank (the factored types need one), z has another; each pair overlaps in some layers only
ADAPTERS = {"x": dict(r=4, lora_alpha=8, target_modules=["embed", "q", "fc"]),
            "y": dict(r=4, lora_alpha=2, target_modules=["q", "v", "fc"]),
            "z": dict(r=2, lora_alpha=4, target_modules=["embed", "v"])}
WEIGHTS = {"x": 0.7, "y": -0.4, "z": 1.3}  # a negative one: the sign handling is part of what is compared
IDS = torch.tensor([[1, 5, 12, 0, 7], [3, 3, 9, 11, 2]])


def build(adapters=ADAPTERS, init=False, seed=0, net=None):
    """(ours, PEFT's) with the same base and adapter weights; PEFT's adapters get ours, copied by key.
    `net`: a module class built alike for both (default: Tiny, with each library's Conv1D)."""
    torch.manual_seed(seed)
    base, reference = (net(), net()) if net else (Tiny(Conv1D), Tiny(HFConv1D))
    reference.load_state_dict(base.state_dict())
    (first, kwargs), *rest = adapters.items()
    with warnings.catch_warnings():  # both warn that they set fan_in_fan_out per layer (Conv1D True, Linear False)
        warnings.simplefilter("ignore")
        ours = get_peft_model(base, LoraConfig(**kwargs, init_lora_weights=init), first)
        theirs = peft.get_peft_model(reference, peft.LoraConfig(**kwargs, init_lora_weights=init), first)
        for name, kwargs in rest:
            ours.add_adapter(name, LoraConfig(**kwargs, init_lora_weights=init))
            theirs.add_adapter(name, peft.LoraConfig(**kwargs, init_lora_weights=init))
    if init is not False:  # B starts at zero: move every factor, or the combination is trivially zero
        with torch.no_grad():
            for p in (p for n in adapters for p in ours.adapter_parameters(n)):
                p.add_(torch.randn_like(p))
    state = ours.state_dict()
    assert set(state) == set(theirs.state_dict())
    theirs.load_state_dict(state)
    return ours.eval(), theirs.eval()


def combine_both(ours, theirs, names, combination_type, seed=5, **kwargs):
    weights = [WEIGHTS[n] for n in names]
    with warnings.catch_warnings():  # PEFT warns per tensor at density 1 (nothing pruned)
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs.add_weighted_adapter(names, weights, "mix", combination_type=combination_type, **kwargs)
        torch.manual_seed(seed)
        add_weighted_adapter(ours, names, weights, "mix", combination_type=combination_type, **kwargs)


def mix_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".mix" in k}


def outputs(model, adapter="mix", inputs=IDS):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(inputs)


def assert_equal_to_peft(ours, theirs, inputs=IDS):
    ours_tensors, peft_tensors = mix_tensors(ours), mix_tensors(theirs)
    assert set(ours_tensors) == set(peft_tensors) and ours_tensors
    for key, tensor in ours_tensors.items():
        assert_close(tensor, peft_tensors[key])
    assert any(t.abs().max() > 0 for t in ours_tensors.values())
    base = outputs(ours, "x", inputs)
    assert (outputs(ours, "mix", inputs) - base).abs().max() > 1e-3, "the combined adapter must change the output"
    assert_close(outputs(ours, "mix", inputs), outputs(theirs, "mix", inputs))
    mine, reference = ours.peft_config["mix"], theirs.peft_config["mix"]
    assert (mine.r, mine.lora_alpha) == (reference.r, reference.lora_alpha)
    targets = reference.target_modules
    assert (set(mine.target_modules) if isinstance(targets, set) else mine.target_modules) == targets


def names_for(combination_type):
    return ["x", "y"] if combination_type in FACTORED_TYPES else ["x", "y", "z"]


SIGN_CASES = [(t, "total") for t in COMBINATION_TYPES] + [(t, "frequency") for t in COMBINATION_TYPES if "ties" in t]


@pytest.mark.parametrize("combination_type, majority_sign_method", SIGN_CASES)
def test_combined_adapter_equals_peft(combination_type, majority_sign_method):
    ours, theirs = build()
    combine_both(ours, theirs, names_for(combination_type), combination_type, density=0.5,
                 majority_sign_method=majority_sign_method)
    assert_equal_to_peft(ours, theirs)


OPTION_CASES = {
    "svd_rank": ("svd", dict(svd_rank=3)),
    "svd_rank_cat_of_ranks": ("ties_svd", dict(svd_rank=5, density=0.7)),
    "svd_clamp": ("svd", dict(svd_clamp=0.9)),
    "reduced_svd": ("dare_linear_svd", dict(svd_full_matrices=False, density=0.3)),
    "density_0": ("magnitude_prune", dict(density=0.0)),
    "density_1_no_draws": ("dare_ties", dict(density=1.0)),
    "sparse_ties": ("ties", dict(density=0.2, majority_sign_method="frequency")),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_equal_peft(case):
    combination_type, kwargs = OPTION_CASES[case]
    ours, theirs = build()
    combine_both(ours, theirs, names_for(combination_type), combination_type, **kwargs)
    if kwargs.get("density") == 0.0:  # everything pruned: all zeros in both, nothing else to compare
        assert all(t.abs().max() == 0 for t in mix_tensors(ours).values())
        assert all(t.abs().max() == 0 for t in mix_tensors(theirs).values())
        return
    assert_equal_to_peft(ours, theirs)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_linear_svd"])
def test_regex_targets_and_rank_patterns_equal_peft(combination_type):
    adapters = {"x": dict(r=2, lora_alpha=4, target_modules=r"(q|fc)", rank_pattern={"fc": 3}),
                "y": dict(r=3, lora_alpha=3, target_modules=r"embed|v")}
    ours, theirs = build(adapters)
    combine_both(ours, theirs, ["x", "y"], combination_type, density=0.6)
    assert ours.peft_config["mix"].target_modules == "((q|fc))|(embed|v)"
    assert_equal_to_peft(ours, theirs)


def test_dare_draws_follow_peft_order_whatever_the_injection_draws(monkeypatch):
    """With init_lora_weights=True PEFT's embedding injection draws random numbers ours does not, so a plain seed no
    longer lines the streams up. Bernoulli masks from a generator re-seeded before each call must still agree: the
    masks are drawn in the same order and shapes."""
    real, generator = torch.bernoulli, torch.Generator()
    monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kwargs: real(p, generator=generator))
    for combination_type in ("dare_ties", "dare_linear_svd"):
        ours, theirs = build(init=True)
        names = names_for(combination_type)
        weights = [WEIGHTS[n] for n in names]
        generator.manual_seed(7)
        theirs.add_weighted_adapter(names, weights, "mix", combination_type=combination_type, density=0.4)
        generator.manual_seed(7)
        add_weighted_adapter(ours, names, weights, "mix", combination_type=combination_type, density=0.4)
        assert_equal_to_peft(ours, theirs)


def test_dare_prunes_at_the_density_and_rescales():
    """Statistics of the random pruning itself: about `density` of the entries kept, each divided by density."""
    merge = WeightedMerge("dare_linear", rank=1, density=0.3)
    merged = merge_tensors("dare_linear", [torch.ones(200, 200)], torch.tensor([1.0]), merge)
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert_close(merged[kept], torch.full_like(merged[kept], 1 / 0.3))


@pytest.mark.parametrize("combination_type", ["svd", "linear", "dare_linear", "ties"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_factors_are_handled_by_shape_as_peft(combination_type, kernel):
    """A LoRA layer on a conv (factors of conv shapes, its own delta_weight): the layer-level combination equals
    PEFT's for its Conv2d LoRA layer, computed on the same layer."""
    torch.manual_seed(0)
    layer = PeftConv2d(nn.Conv2d(3, 5, kernel), "x", peft.LoraConfig(init_lora_weights=False), r=2, lora_alpha=4)
    layer.update_layer("y", r=2, lora_alpha=3, config=peft.LoraConfig(init_lora_weights=False))
    shapes = (torch.Size([2, 3, kernel, kernel]), torch.Size([5, 2, 1, 1]))
    view = nn.Module()  # what weighted.py reads of a layer, with peftcore's method name for the delta
    view.lora_A, view.lora_B, view.scaling = layer.lora_A, layer.lora_B, layer.scaling
    view.delta_weight = layer.get_delta_weight
    density, sources = 0.5, [("x", 0.6), ("y", -1.1)]
    torch.manual_seed(3)
    if combination_type == "svd":
        expected_A, expected_B = PeftLoraModel._svd_generalized_task_arithmetic_weighted_adapter(
            None, "svd", ["x", "y"], [0.6, -1.1], 2, layer, torch.empty(shapes[0]), torch.empty(shapes[1]), density,
            "total")
    else:
        expected_A, expected_B = PeftLoraModel._generalized_task_arithmetic_weighted_adapter(
            None, combination_type, ["x", "y"], [0.6, -1.1], layer, density, "total")
    torch.manual_seed(3)
    A, B = fitted_factors(view, sources, WeightedMerge(combination_type, 2, density), *shapes)
    assert_close(A, expected_A)
    assert_close(B, expected_B)


class ConvNet(nn.Module):
    """A 3x3 conv (grouped when GROUPS > 1) and a 1x1 one: LoRA layers whose factors are conv kernels."""

    GROUPS = 1

    def __init__(self):
        super().__init__()
        self.conv, self.pw = nn.Conv2d(4, 6, 3, padding=1, groups=self.GROUPS), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.pw(torch.tanh(self.conv(x)))


class GroupedConvNet(ConvNet):
    GROUPS = 2


CONV_ADAPTERS = {"x": dict(r=2, lora_alpha=4, target_modules=["conv", "pw"]),
                 "y": dict(r=2, lora_alpha=2, target_modules=["conv"]),
                 "z": dict(r=4, lora_alpha=2, target_modules=["conv", "pw"])}


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "dare_ties", "ties_svd", "dare_linear_svd"])
def test_conv_lora_layers_combine_as_peft(combination_type):
    pytest.importorskip("peftcore.lora.conv")  # peftcore's conv LoRA layer (LoraConv)
    ours, theirs = build(CONV_ADAPTERS, net=ConvNet)
    combine_both(ours, theirs, names_for(combination_type), combination_type, density=0.5)
    assert_equal_to_peft(ours, theirs, inputs=torch.randn(2, 4, 5, 5))


def test_grouped_conv_combines_linearly_and_refuses_cat_and_svd():
    """A grouped lora_B reads its own block of A's rows: adding factors keeps the blocks, stacking them does not."""
    pytest.importorskip("peftcore.lora.conv")
    with warnings.catch_warnings():  # "LoRA on a grouped conv cannot be merged"
        warnings.simplefilter("ignore")
        ours, theirs = build(CONV_ADAPTERS, net=GroupedConvNet)
    for combination_type in ("cat", "svd"):
        with pytest.raises(ValueError, match="cannot combine adapters on a grouped Conv2d"):
            add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "mix", combination_type=combination_type)
        assert "mix" not in ours.peft_config
    combine_both(ours, theirs, ["x", "y"], "linear")
    assert_equal_to_peft(ours, theirs, inputs=torch.randn(2, 4, 5, 5))


def test_new_adapter_is_added_inactive():
    ours, _ = build()
    before = outputs(ours, "y")
    add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "mix", combination_type="cat")
    assert ours.active_adapter == "y"
    assert not any(p.requires_grad for p in ours.adapter_parameters("mix"))
    with torch.no_grad():
        assert_close(ours(IDS), before)


def test_a_layer_the_union_reaches_but_no_adapter_holds_gets_zeros():
    """y excludes embed, x (whose config the new adapter takes) does not: embed gets "mix" but holds neither
    source (PEFT raises there). v holds y only, q x only: at their rank the SVD is exact."""
    adapters = {"x": dict(r=2, target_modules=["q", "fc"]),
                "y": dict(r=2, target_modules=["v", "embed"], exclude_modules=["embed"])}
    ours, _ = build(adapters)
    add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "mix", combination_type="svd")
    model = ours.base_model.model
    assert "mix" in model.embed.r and not model.embed.delta_weight("mix").any()
    assert_close(model.v.delta_weight("mix"), model.v.delta_weight("y"), atol=1e-5, rtol=1e-4)
    assert_close(model.q.delta_weight("mix"), model.q.delta_weight("x"), atol=1e-5, rtol=1e-4)


# -- properties ---------------------------------------------------------------------------------------
def ours_only(adapters: dict, seed: int):
    torch.manual_seed(seed)
    (first, kwargs), *rest = adapters.items()
    with warnings.catch_warnings():  # that fan_in_fan_out is set per layer (Conv1D True, nn.Linear False)
        warnings.simplefilter("ignore")
        model = get_peft_model(Tiny(), LoraConfig(**kwargs, init_lora_weights=False), first)
        for name, kwargs in rest:
            model.add_adapter(name, LoraConfig(**kwargs, init_lora_weights=False))
    return model


def layers(model):
    return [m for m in model.modules() if isinstance(m, LORA_LAYERS)]


def summed_delta(layer, weights: dict[str, float]) -> torch.Tensor:
    return sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.r)


ALL_TARGETS = ["embed", "q", "v", "fc", "head"]
weights_st = st.floats(-2, 2).filter(lambda w: abs(w) > 0.05)


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 4), alpha=st.sampled_from([1.0, 4.0, 8.0]), weight=weights_st, seed=st.integers(0, 2**16),
       combination_type=st.sampled_from(["linear", "svd"]))
def test_one_adapter_combines_to_its_weighted_delta(r, alpha, weight, seed, combination_type):
    """One adapter always combines "linear" (as in PEFT): sqrt(|w s|) on both factors gives w * s B A."""
    model = ours_only({"x": dict(r=r, lora_alpha=alpha, target_modules=ALL_TARGETS)}, seed)
    add_weighted_adapter(model, ["x"], [weight], "mix", combination_type=combination_type)
    assert model.peft_config["mix"].r == r
    for layer in layers(model):
        assert_close(layer.delta_weight("mix"), weight * layer.delta_weight("x"))


@settings(max_examples=10, deadline=None)
@given(r1=st.integers(1, 4), r2=st.integers(1, 4), w1=weights_st, w2=weights_st, seed=st.integers(0, 2**16),
       full_matrices=st.booleans())
def test_svd_at_full_rank_is_the_exact_weighted_sum(r1, r2, w1, w2, seed, full_matrices):
    """svd_rank above every layer's min(out, in) (8 here, past PEFT's limit): nothing is truncated."""
    model = ours_only({"x": dict(r=r1, lora_alpha=2 * r1, target_modules=["embed", "q", "fc"]),
                       "y": dict(r=r2, lora_alpha=3.0, target_modules=["q", "v", "fc"])}, seed)
    add_weighted_adapter(model, ["x", "y"], [w1, w2], "mix", svd_rank=8, svd_full_matrices=full_matrices)
    for layer in layers(model):
        assert_close(layer.delta_weight("mix"), summed_delta(layer, {"x": w1, "y": w2}), atol=1e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(r1=st.integers(1, 4), r2=st.integers(1, 4), unit=st.booleans(), w1=weights_st, w2=weights_st,
       seed=st.integers(0, 2**16))
def test_cat_is_exactly_the_weighted_sum_of_deltas(r1, r2, unit, w1, w2, seed):
    weights = {"x": 1.0, "y": 1.0} if unit else {"x": w1, "y": w2}
    model = ours_only({"x": dict(r=r1, lora_alpha=5.0, target_modules=["embed", "q", "fc"]),
                       "y": dict(r=r2, lora_alpha=2.0, target_modules=["q", "v", "fc", "head"])}, seed)
    add_weighted_adapter(model, ["x", "y"], list(weights.values()), "mix", combination_type="cat")
    assert model.peft_config["mix"].r == r1 + r2
    for layer in layers(model):
        assert_close(layer.delta_weight("mix"), summed_delta(layer, weights))


# -- refusals -----------------------------------------------------------------------------------------
REFUSALS = {
    "unknown adapter": (dict(adapters=["x", "zz"]), ValueError, "unknown adapter"),
    "existing name": (dict(adapter_name="y"), ValueError, "exists already"),
    "weights count": (dict(weights=[1.0]), ValueError, "one weight per adapter"),
    "no adapters": (dict(adapters=[], weights=[]), ValueError, "one weight per adapter"),
    "combination type": (dict(combination_type="mean"), ValueError, "not one of"),
    "ranks for linear": (dict(adapters=["x", "z"], weights=[1.0, 1.0], combination_type="linear"), ValueError,
                         r"one rank; got ranks \[4, 2\]"),
    "density missing": (dict(combination_type="ties"), ValueError, "give density in"),
    "density too big": (dict(combination_type="dare_linear_svd", density=1.5), ValueError, "give density in"),
    "sign method": (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), ValueError,
                    "majority_sign_method"),
    "svd rank": (dict(svd_rank=0), ValueError, "svd_rank must be"),
    "svd clamp": (dict(svd_clamp=2.0), ValueError, "svd_clamp is a quantile"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_change_nothing(case):
    kwargs, error, message = REFUSALS[case]
    ours, _ = build()
    call = {**dict(adapters=["x", "y"], weights=[1.0, 1.0], adapter_name="mix"), **kwargs}
    with pytest.raises(error, match=message) as raised:
        add_weighted_adapter(ours, **call)
    assert "\n" not in str(raised.value)
    assert list(ours.peft_config) == ["x", "y", "z"]


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_adapters_are_refused(option):
    model = ours_only({"x": dict(r=2, target_modules=["q"]), "w": dict(r=2, target_modules=["q"], **{option: True})},
                      0)
    with pytest.raises(ValueError, match=f"adapter 'w' has {option}=True"):
        add_weighted_adapter(model, ["x", "w"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in model.peft_config


def test_mixed_regex_and_list_targets_are_refused():
    model = ours_only({"x": dict(r=2, target_modules=["q"]), "y": dict(r=2, target_modules=r"v")}, 0)
    with pytest.raises(ValueError, match="mix a regex target_modules"):
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config


def test_prompt_adapters_are_refused():
    llama = from_config(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt-learning adapters"):
        add_weighted_adapter(model, ["default"], [1.0], "mix")


def test_modules_to_save_in_two_adapters_is_refused():
    model = ours_only({"x": dict(r=2, target_modules=["q"], modules_to_save=["head"]),
                       "y": dict(r=2, target_modules=["q"], modules_to_save=["head"])}, 0)
    with pytest.raises(ValueError, match="head is a modules_to_save copy in several"):
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "mix", combination_type="cat")


def test_a_failure_inside_the_layers_leaves_no_adapter_behind():
    """Rank patterns with one largest rank pass the rank check but give v two shapes of A: linear cannot add them."""
    model = ours_only({"x": dict(r=4, target_modules=["q", "v"]),
                       "y": dict(r=2, rank_pattern={"q": 4}, target_modules=["q", "v"])}, 0)
    with pytest.raises(ValueError, match="have the shapes"):
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "mix", combination_type="linear")
    assert "mix" not in model.peft_config
    assert not any("mix" in layer.r for layer in layers(model))
