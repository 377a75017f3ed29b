"""LoraConfig.target_parameters (LoRA on bare nn.Parameters: MoE expert stacks, a 2-D weight) against the installed
HF PEFT, on a tiny MoE model: expert stacks (E, in, out) used through torch.bmm, a transposed stack (E, out, in) with
`is_transposed`, and a 2-D (out, in) weight used through F.linear.

Both libraries build their adapters from the same seed (init_lora_weights=False: A and B random), so the weights are
the same draws; both then do the same ops, so outputs and gradients are compared for exact equality.
"""
import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.lora.param_wrapper import ParamWrapper
from peftcore.lora.registry import LORA_LAYERS
from tests.tolerances import assert_close

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
TRANSPOSED = ["transposed.gate_up_proj", "transposed.down_proj"]
ALL = EXPERTS + TRANSPOSED + ["mix.weight"]


class Experts(nn.Module):
    """Every token through every expert, averaged: gate_up (E, d, 2h), down (E, h, d); with is_transposed the
    stacks are stored (E, out, in) instead, as some MoE implementations do."""

    def __init__(self, experts=3, d=6, h=4, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        gate_up, down = (experts, d, 2 * h), (experts, h, d)
        if transposed:
            gate_up, down = (experts, 2 * h, d), (experts, d, h)
        self.gate_up_proj = nn.Parameter(torch.randn(gate_up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.3)

    def forward(self, x):
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.is_transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        xs = x.reshape(1, -1, x.shape[-1]).expand(gate_up.shape[0], -1, -1)
        g, u = torch.bmm(xs, gate_up).chunk(2, -1)
        return torch.bmm(F.silu(g) * u, down).mean(0).view_as(x)


class Mix(nn.Module):
    def __init__(self, d=6, out=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, d) * 0.3)
        self.bias = nn.Parameter(torch.randn(out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MoE(nn.Module):
    def __init__(self, experts=3):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.experts = Experts(experts)
        self.transposed = Experts(experts, transposed=True)
        self.mix = Mix()

    def forward(self, x):
        h = self.proj(x)
        return self.mix(h + self.experts(h) + self.transposed(h))


def inputs():
    return torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return MoE().eval()


def kwargs(**over) -> dict:
    return {**dict(r=2, lora_alpha=4, target_modules=[], target_parameters=ALL, init_lora_weights=False), **over}


def build(base, **over):
    """-> (PEFT's model, ours), each made from the same seed."""
    models = []
    for make, config in ((peft.get_peft_model, peft.LoraConfig), (get_peft_model, LoraConfig)):
        torch.manual_seed(2)
        models.append(make(copy.deepcopy(base), config(**kwargs(**over))).eval())
    return tuple(models)


@torch.no_grad()
def run(model, x=None):
    return model(inputs() if x is None else x)


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def file_tensors(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("targets", [ALL, EXPERTS, ["mix.weight"], ["down_proj"]], ids=["all", "experts", "2d", "end"])
def test_keys_counts_weights_and_outputs_equal_peft(base, targets):
    reference, ours = build(base, target_parameters=targets)
    assert_same(ours.state_dict(), reference.state_dict())  # same keys (nesting), shapes and draws
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert (run(reference) - run(base)).abs().max() > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(run(ours), run(reference), rtol=0, atol=0)


def test_layout_nesting_and_delta_weights_equal_peft(base):
    reference, ours = build(base)
    experts = ours.model.experts
    assert isinstance(experts, ParamWrapper) and experts.parameter_name == "down_proj"  # the later one outside
    assert experts.base_layer.parameter_name == "gate_up_proj" and isinstance(experts.base_layer.base_layer, Experts)
    assert experts.lora_A["default"].weight.shape == (2 * 3, 6) and experts.lora_B["default"].weight.shape == (4, 6)
    assert ours.model.transposed.lora_A["default"].weight.shape == (6, 6)  # (r*E, P) for an (E, P, Q) stack
    for key in ALL:
        module = key.split(".")[0]
        theirs = reference.base_model.model.get_submodule(module)
        mine = ours.model.get_submodule(module)
        while theirs.parameter_name != key.split(".")[1]:
            theirs, mine = theirs.base_layer, mine.base_layer
        torch.testing.assert_close(mine.delta_weight("default"), theirs.get_delta_weight("default"), rtol=0, atol=0)
        assert mine.delta_weight("default").shape == mine.get_param().shape


def test_gradients_equal_peft(base):
    reference, ours = build(base)
    for model in (reference, ours):
        model.train()
        model(inputs()).square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (reference, ours)]
    assert_same(grads[1], grads[0])
    assert all(g.abs().sum() > 0 for g in grads[1].values())


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_initialised_adapters_equal_peft_and_zero_b_equals_the_base(base, init):
    reference, ours = build(base, init_lora_weights=init)
    assert_same(ours.state_dict(), reference.state_dict())
    torch.testing.assert_close(run(ours), run(base), rtol=0, atol=0)


def test_with_target_modules_and_one_expert(base):
    """A LoRA layer beside the wrappers; stacks of one expert (PEFT takes the 2-D formula, s * B A, for them)."""
    torch.manual_seed(0)
    one = MoE(experts=1).eval()
    for model, targets in ((base, ALL), (one, EXPERTS + ["mix.weight"])):
        reference, ours = build(model, target_modules=["proj"], target_parameters=targets)
        assert_same(ours.state_dict(), reference.state_dict())
        assert_close(run(ours), run(reference))
    # transposed, PEFT's (Q, P) update does not fit a (1, P, Q) stack: PEFT fails in the forward, we when wrapping
    with pytest.raises(ValueError, match="one-expert stack"):
        get_peft_model(copy.deepcopy(one), LoraConfig(**kwargs(target_parameters=TRANSPOSED)))


def test_bf16_parameters_take_fp32_adapters_as_peft(base):
    reference, ours = build(copy.deepcopy(base).to(torch.bfloat16))
    assert ours.model.experts.lora_A["default"].weight.dtype == torch.float32
    assert_same(ours.state_dict(), reference.state_dict())
    x = inputs().to(torch.bfloat16)
    torch.testing.assert_close(run(ours, x), run(reference, x), rtol=0, atol=0)


def test_several_adapters_on_the_same_parameters(base):
    reference, ours = build(base)
    for model, config in ((reference, peft.LoraConfig), (ours, LoraConfig)):
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: rank_pattern matched no *module* (it applies it all the same)
            model.add_adapter("other", config(**kwargs(r=3, rank_pattern={"mix.weight": 1})))
    assert_same(ours.state_dict(), reference.state_dict())
    assert ours.model.mix.lora_A["other"].weight.shape == (1, 6)  # rank_pattern keys are parameter keys
    for active in ("other", ["default", "other"]):
        reference.base_model.set_adapter(active)
        ours.set_adapter(active)
        torch.testing.assert_close(run(ours), run(reference), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must all target the same ones"):
        ours.add_adapter("third", LoraConfig(**kwargs(target_parameters=EXPERTS)))
    with pytest.raises(ValueError, match="same set"):
        reference.add_adapter("third", peft.LoraConfig(**kwargs(target_parameters=EXPERTS)))
    ours.delete_adapter("other")
    assert not any("other" in k for k in ours.state_dict())


def test_merge_unmerge_and_merge_and_unload(base):
    reference, ours = build(base)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    unmerged = run(ours)
    ours.merge_adapter()
    reference.merge_adapter()
    assert_close(run(ours), unmerged)
    torch.testing.assert_close(run(ours), run(reference), rtol=0, atol=0)
    ours.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in before:
            assert_close(p, before[name])
    assert_close(run(ours), unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.unmerge_adapter()
        plain_reference = reference.merge_and_unload()
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LORA_LAYERS) for m in plain.modules())
    assert type(plain.experts) is Experts and set(plain.state_dict()) == set(base.state_dict())
    assert_same(plain.state_dict(), plain_reference.state_dict())
    assert_close(run(plain), unmerged)


def test_safe_merge_refuses_a_broken_adapter_and_merges_nothing(base):
    _, ours = build(base)
    with torch.no_grad():
        ours.model.experts.base_layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert not any(m.merged_adapters for m in ours.modules() if isinstance(m, ParamWrapper))


def test_disabled_adapters_give_the_base_output(base):
    _, ours = build(base)
    with ours.disable_adapter():
        torch.testing.assert_close(run(ours), run(base), rtol=0, atol=0)
    assert (run(ours) - run(base)).abs().max() > 1e-2
    plain = ours.unload()
    assert_same(plain.state_dict(), base.state_dict())
    torch.testing.assert_close(run(plain), run(base), rtol=0, atol=0)


def test_files_load_both_ways(base, tmp_path):
    reference, ours = build(base)
    with torch.no_grad():
        for p in ours.parameters():  # ours now differs from PEFT's: the files must carry it
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    theirs_file, ours_file = file_tensors(tmp_path / "peft"), file_tensors(tmp_path / "ours")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_parameters"] == ALL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        loaded_here = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        on_meta = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", low_cpu_mem_usage=True)
    torch.testing.assert_close(run(loaded_by_peft), run(ours), rtol=0, atol=0)
    torch.testing.assert_close(run(loaded_here), run(reference), rtol=0, atol=0)
    torch.testing.assert_close(run(on_meta), run(reference), rtol=0, atol=0)


@pytest.mark.parametrize("over, match", [
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(use_dora=True), "use_dora"),
], ids=["dropout", "fan_in_fan_out", "lora_bias", "dora"])
def test_options_peft_refuses_are_refused(base, over, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(**over)))
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs(**over)))


@pytest.mark.parametrize("over, match", [
    (dict(target_parameters=["weight"]), "top-level module"),
    (dict(target_modules=["proj"], target_parameters=["proj.weight"]), "target_modules adapts already"),
], ids=["top-level", "lora-layer"])
def test_parameters_peft_cannot_wrap_are_refused(base, over, match):
    model = base.mix if over["target_parameters"] == ["weight"] else base
    with pytest.raises(ValueError, match=match):
        get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs(**over)))
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs(**over)))


def test_unmatched_or_unusable_targets_are_refused(base):
    with pytest.raises(ValueError, match=r"matched no parameter.*experts\.gate_up_proj"):
        get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(target_parameters=["experts.nothing"])))
    with pytest.raises(ValueError, match="factorisation"):
        get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(init_lora_weights="pissa")))
    with pytest.raises(TypeError, match="not a str"):
        get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(target_parameters="mix.weight")))
    with pytest.warns(RuntimeWarning, match="matched no parameter"):  # PEFT warns too: proj took the adapter
        get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs(target_modules=["proj"], target_parameters=["x.y"])))
    parametrized = copy.deepcopy(base)
    torch.nn.utils.parametrize.register_parametrization(parametrized.mix, "weight", nn.Identity())
    with pytest.raises(ValueError, match="parametrized"):
        get_peft_model(parametrized, LoraConfig(**kwargs()))
    assert not any(isinstance(m, ParamWrapper) for m in parametrized.modules())  # checked before wrapping any
    assert not any(isinstance(m, ParamWrapper) for m in base.modules())


def test_a_mixed_adapter_batch_is_refused(base):
    _, ours = build(base)
    with pytest.raises(ValueError, match="mixed adapter_names batch"):
        ours(inputs(), adapter_names=["default", "__base__"])


class Float8Experts(nn.Module):
    """float8 storage, computed in float32 (CPU has no float8 matmul)."""

    def __init__(self):
        super().__init__()
        self.stack = nn.Parameter((torch.randn(3, 6, 4) * 0.3).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight = nn.Parameter((torch.randn(5, 6) * 0.3).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x):
        return torch.bmm(x, self.stack.float()).sum(0) + F.linear(x[0], self.weight.float()).sum()


class Float8Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = Float8Experts()

    def forward(self, x):
        return self.up(x)


def test_float8_parameters_add_the_update_in_float32_as_peft():
    torch.manual_seed(0)
    reference, ours = build(Float8Model(), target_parameters=["up.stack", "up.weight"])
    x = torch.randn(3, 2, 6)
    torch.testing.assert_close(run(ours, x), run(reference, x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="float8"):
        ours.merge_adapter()
    assert not any(m.merged_adapters for m in ours.modules() if isinstance(m, ParamWrapper))


def test_weighted_combination_different_targets_and_dora_on_meta_are_refused():
    """PEFT's refusals, reached through the backend: a weighted combination of parameter adapters, a second
    adapter targeting other parameters, DoRA even where low_cpu_mem_usage injects without it first."""
    model = get_peft_model(MoE(), LoraConfig(target_parameters=["experts.gate_up_proj"], r=2))
    with pytest.raises(ValueError, match="targets bare parameters"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(ValueError, match="must all target the same ones"):
        model.add_adapter("other", LoraConfig(target_parameters=["experts.down_proj"], r=2))
    with pytest.raises(ValueError, match="use_dora=True does not work with target_parameters"):
        get_peft_model(MoE(), LoraConfig(target_parameters=["experts.gate_up_proj"], use_dora=True),
                       low_cpu_mem_usage=True)
