"""AdaLoRA's layers against HF PEFT 0.21.2's SVDLinear / SVDConv2d, on one tiny torch module per case.

Each case wraps one deep copy of the module with peft.get_peft_model and another with inject_adalora, the global
RNG seeded the same before each: both draw A, E, B and ranknum's placeholder in PEFT's order, so the adapters must
come out bit-equal (init_lora_weights True and False, fp32 / fp16 / bf16 bases, autocast_adapter_dtype on and off).
Then outputs, gradients and merges are compared on the same inputs. The module holds one of each kind AdaLoRA
adapts: nn.Linear (6 -> 5), transformers' GPT-2 Conv1D (6 -> 7, stored (in, out)) and nn.Conv2d (3 -> 4, 3x3).
"""
import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D as HFConv1D  # noqa: E402

from peftcore.adalora import ADALORA_LAYERS, AdaLoraConfig, AdaLoraConv2d, AdaLoraLinear, inject_adalora  # noqa: E402
from peftcore.models.layers import Conv1D  # noqa: E402
from peftcore.models.quantized import QuantLinear  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

TARGETS = ["lin", "c1d", "conv"]
ADAPTER_WORDS = ("lora_A", "lora_B", "lora_E")


class Tiny(nn.Module):
    def __init__(self, conv1d=HFConv1D):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.c1d = conv1d(7, 6)  # GPT-2's (nf, nx): out 7, in 6
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.c1d(x), self.conv(img)


def tiny(dtype=torch.float32, conv1d=HFConv1D) -> Tiny:
    torch.manual_seed(0)
    model = Tiny(conv1d)
    with torch.no_grad():  # Conv1D's bias starts at 0: move it, so a bias in the wrong place shows
        model.c1d.bias.normal_()
    return model.to(dtype)


def kwargs(**overrides) -> dict:
    return dict(target_modules=TARGETS, init_r=4, target_r=2, total_step=10, lora_alpha=3, **overrides)


def build(model: nn.Module, autocast: bool = True, ours_model: nn.Module | None = None, **overrides):
    """(PEFT's PeftModel, our module with the adapter injected), each from a copy, the same RNG state before each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn when they flip fan_in_fan_out for Conv1D
        torch.manual_seed(1)
        hf = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**kwargs(**overrides)),
                                 autocast_adapter_dtype=autocast)
        ours = copy.deepcopy(ours_model if ours_model is not None else model)
        torch.manual_seed(1)
        inject_adalora(ours, AdaLoraConfig(**kwargs(**overrides)), "default", autocast_adapter_dtype=autocast)
    for name, p in ours.named_parameters():  # PeftModel's job, not inject's: freeze the base as PEFT does
        p.requires_grad_(any(w in name for w in ADAPTER_WORDS))
    return hf, ours


def inputs(dtype=torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(2)
    x, img = torch.randn(2, 3, 6, generator=g).to(dtype), torch.randn(2, 3, 5, 5, generator=g).to(dtype)
    return x.requires_grad_(grad), img.requires_grad_(grad)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, (*ADALORA_LAYERS, peft.tuners.adalora.AdaLoraLayer))}


def assert_states_bit_equal(ours: nn.Module, hf) -> None:
    mine, theirs = ours.state_dict(), hf.base_model.model.state_dict()
    assert list(mine) == list(theirs)  # same keys, same order
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


@pytest.mark.parametrize("init", [True, False])
def test_same_seed_init_is_bit_equal_to_peft(init):
    hf, ours = build(tiny(), init_lora_weights=init)
    assert_states_bit_equal(ours, hf)
    assert {n: type(m) for n, m in layers(ours).items()} == {"lin": AdaLoraLinear, "c1d": AdaLoraLinear,
                                                             "conv": AdaLoraConv2d}
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix("base_model.model.") for n, p in hf.named_parameters() if p.requires_grad)
    state = ours.state_dict()
    assert tuple(state["conv.lora_A.default"].shape) == (4, 3 * 3 * 3) and state["c1d.ranknum.default"].item() == 4
    E, A = state["lin.lora_E.default"], state["lin.lora_A.default"]
    assert (E.abs().sum() == 0) == init and A.abs().min() > 0  # True: E = 0 (the base), A, B ~ N(0, 0.02)
    assert (A.std() < 0.1) == init


def test_outputs_and_every_gradient_equal_peft():
    hf, ours = build(tiny(), init_lora_weights=False)
    x, img = inputs(grad=True)
    x2, img2 = inputs(grad=True)
    mine, theirs = ours(x, img), hf(x2, img2)
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
    base = tiny()(*inputs())
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(mine, base))  # the adapter changes every output
    sum(o.square().sum() for o in mine).backward()
    sum(o.square().sum() for o in theirs).backward()
    hf_params = dict(hf.base_model.model.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == 9
    for name, p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, hf_params[name].grad)
    assert_close(x.grad, x2.grad), assert_close(img.grad, img2.grad)


def test_zero_init_is_the_base_yet_e_gets_a_gradient_equal_to_peft():
    model = tiny()
    hf, ours = build(model)
    base = model(*inputs())
    mine = ours(*inputs())
    for a, b in zip(mine, base):
        assert torch.equal(a, b)  # E = 0: the update is exactly zero
    sum(o.square().sum() for o in mine).backward()
    sum(o.square().sum() for o in hf(*inputs())).backward()
    hf_params = dict(hf.base_model.model.named_parameters())
    for name in ("lin", "c1d", "conv"):
        E = dict(ours.named_parameters())[f"{name}.lora_E.default"]
        assert E.grad.abs().min() > 0 and torch.equal(E.grad, hf_params[f"{name}.lora_E.default"].grad)
        assert dict(ours.named_parameters())[f"{name}.lora_A.default"].grad.abs().sum() == 0  # E = 0 blocks it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_equals_peft_merged_weight_and_unmerge_restores(dtype):
    hf, ours = build(tiny(dtype), init_lora_weights=False)
    x, img = inputs(dtype)
    with torch.no_grad():
        unmerged = ours(x, img)
        mine, theirs = layers(ours), layers(hf)
        before = {n: layer.base_layer.weight.detach().clone() for n, layer in mine.items()}
        for name, layer in mine.items():
            assert torch.equal(layer.delta_weight("default"), theirs[name].get_delta_weight("default")), name
            layer.merge()
        hf.base_model.merge_adapter()
        rounded = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)  # the merged weight is rounded
        for a, b in zip(ours(x, img), unmerged):
            assert_close(a, b, **rounded)
        for name, layer in mine.items():
            W = layer.base_layer.weight
            assert W.dtype == dtype and torch.equal(W, theirs[name].base_layer.weight), name
            assert (W - before[name]).abs().max() > 0, name
            layer.unmerge()
            assert layer.merged_adapters == []
        hf.base_model.unmerge_adapter()
        for name, layer in mine.items():  # PEFT's unmerge rounds the same way: bit-equal to it, near the original
            assert torch.equal(layer.base_layer.weight, theirs[name].base_layer.weight), name
            assert_close(layer.base_layer.weight, before[name])
        for a, b in zip(ours(x, img), unmerged):
            assert_close(a, b, **rounded)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases_keep_peft_dtypes_values_and_outputs(dtype, autocast):
    hf, ours = build(tiny(dtype), autocast=autocast, init_lora_weights=False)
    assert_states_bit_equal(ours, hf)  # every tensor's dtype too: fp32 adapters with autocast, else the base's
    A = ours.state_dict()["lin.lora_A.default"]
    assert A.dtype == (torch.float32 if autocast else dtype)
    assert torch.equal(A, A.to(dtype).to(A.dtype))  # PEFT rounds the init to the base dtype first: kept
    x, img = inputs(dtype)
    with torch.no_grad():
        for a, b in zip(ours(x, img), hf(x, img)):
            assert a.dtype == dtype and torch.equal(a, b)


def test_dropout_draws_the_same_masks_as_peft_in_training_and_none_in_eval():
    hf, ours = build(tiny(), init_lora_weights=False, lora_dropout=0.5)
    assert isinstance(ours.lin.lora_dropout["default"], nn.Dropout) and ours.lin.lora_dropout["default"].p == 0.5
    hf.train(), ours.train()
    x, img = inputs()
    torch.manual_seed(5)
    mine = ours(x, img)
    torch.manual_seed(5)
    theirs = hf(x, img)
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
    hf.eval(), ours.eval()
    with torch.no_grad():
        evaluated = ours(x, img)
        for a, b, c in zip(evaluated, hf(x, img), mine):
            assert torch.equal(a, b) and (a - c).abs().max() > 1e-3  # eval: no dropout, and dropout did something


def test_peftcore_conv1d_equals_transformers_conv1d_under_peft():
    hf_model, mine = tiny(), tiny(conv1d=Conv1D)
    mine.load_state_dict(hf_model.state_dict())  # both store (in, out): the same keys and shapes
    hf, ours = build(hf_model, ours_model=mine, init_lora_weights=False)
    assert isinstance(ours.c1d.base_layer, Conv1D) and ours.c1d.fan_in_fan_out
    assert_states_bit_equal(ours, hf)
    x, img = inputs()
    mine_out, theirs_out = ours(x, img)[1], hf(x, img)[1]
    assert_close(mine_out, theirs_out)
    mine_out.square().sum().backward(), theirs_out.square().sum().backward()
    for part in ADAPTER_WORDS:
        assert_close(getattr(ours.c1d, part)["default"].grad, getattr(hf.base_model.model.c1d, part)["default"].grad)
    with torch.no_grad():
        assert torch.equal(ours.c1d.delta_weight("default"), hf.base_model.model.c1d.get_delta_weight("default"))
        assert ours.c1d.delta_weight("default").shape == (6, 7)  # (in, out), Conv1D's layout


def test_quantlinear_nf4_base_forward_equals_peft_on_its_dequantized_weight_and_merge_is_refused():
    model = tiny()
    quantized = QuantLinear.from_linear(model.lin, "nf4")
    dense = copy.deepcopy(model)
    with torch.no_grad():
        dense.lin.weight.copy_(quantized.dequantize())  # what the NF4 layer computes with
    mine = copy.deepcopy(model)
    mine.lin = quantized
    hf, ours = build(dense, ours_model=mine, init_lora_weights=False)
    assert isinstance(ours.lin, AdaLoraLinear) and isinstance(ours.lin.base_layer, QuantLinear)
    assert torch.equal(ours.lin.lora_A["default"], hf.base_model.model.lin.lora_A["default"])
    x, _ = inputs()
    out, ref = ours.lin(x), hf.base_model.model.lin(x)
    assert_close(out, ref)
    assert (out - quantized(x)).abs().max() > 1e-2  # the adapter is applied on top of the quantized base
    out.square().sum().backward(), ref.square().sum().backward()
    assert_close(ours.lin.lora_E["default"].grad, hf.base_model.model.lin.lora_E["default"].grad)
    packed = quantized.packed.clone()
    with pytest.raises(TypeError, match="cannot merge AdaLoRA into a quantized base layer in place"):
        ours.lin.merge()
    assert torch.equal(quantized.packed, packed) and ours.lin.merged_adapters == []
