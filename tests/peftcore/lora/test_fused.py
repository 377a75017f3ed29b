"""The fused LoRA linear (LoraLinearFunction): every gradient against autograd of the plain formula."""
import math

import pytest
import torch
from torch import nn

from peftcore import LoraConfig, get_peft_model
from peftcore.kernels import lora_linear
from peftcore.kernels.lora_torch import LoraLinearFunction, dropped_positions
from peftcore.models.layers import Conv1D
from peftcore.models.quantized import QuantLinear


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def lora_layer(kind, bias_mode, p, dtype=torch.float64, **kw):
    K, N = 24, 40
    if kind == "conv1d":
        base = Conv1D(N, K).to(dtype)
        nn.init.normal_(base.bias)
    elif kind in ("nf4", "int8"):  # QLoRA: a quantized base
        base = QuantLinear.from_linear(nn.Linear(K, N, dtype=dtype), kind)
    else:
        base = nn.Linear(K, N, bias=kind == "linear_bias", dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=p, init_lora_weights=False,
                        bias=bias_mode, **kw)
    return get_peft_model(One(base), config).model.proj.train()


def run(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    grads = {"y": y.detach(), "x": x.grad}
    for name, prm in layer.named_parameters():
        if prm.requires_grad:
            grads[name], prm.grad = prm.grad, None
    return grads


def counting_calls(monkeypatch):
    calls = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias_mode", ["none", "all"])
@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d", "nf4", "int8"])
def test_fused_gradients_equal_autograd_of_the_formula(kind, bias_mode, p, monkeypatch):
    layer = lora_layer(kind, bias_mode, p)
    calls = counting_calls(monkeypatch)
    x, g = torch.randn(3, 7, 24, dtype=torch.float64), torch.randn(3, 7, 40, dtype=torch.float64)
    torch.manual_seed(11)
    got = run(layer, x, g)
    assert calls, "the fused path did not run"
    # the reference: autograd of base(x) + s * ((x * mask / (1 - p)) A^T) B^T with the same dropped elements
    torch.manual_seed(11)
    mask = torch.ones(x.numel(), dtype=x.dtype)
    if p > 0:
        mask[dropped_positions(x.numel(), p)] = 0
    base = layer.base_layer
    W = base.dequantize() if kind in ("nf4", "int8") else base.weight.T if kind == "conv1d" else base.weight
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    xr = x.clone().requires_grad_(True)
    y = xr @ W.T + (0 if base.bias is None else base.bias) + s * ((xr * mask.view(x.shape) / (1 - p)) @ A.T) @ B.T
    y.backward(g)
    want = {"y": y.detach(), "x": xr.grad}
    want.update({n: prm.grad for n, prm in layer.named_parameters() if prm.requires_grad})
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=key)


def test_fused_equals_unfused_without_dropout_in_fp32(monkeypatch):
    layer = lora_layer("linear_bias", "all", 0.0, dtype=torch.float32)
    x, g = torch.randn(5, 24), torch.randn(5, 40)
    fused = run(layer, x, g)
    monkeypatch.setattr(lora_linear, "path", lambda *args: None)  # no fused path: the modules run
    unfused = run(layer, x, g)
    for key in fused:
        torch.testing.assert_close(fused[key], unfused[key], msg=key)


@pytest.mark.parametrize("kw", [dict(use_dora=True), dict(lora_bias=True), dict(lora_dropout=0.5)])
def test_layers_the_fused_path_does_not_cover_fall_back(kw, monkeypatch):
    kw = {"lora_dropout": 0.0, **kw}
    p = kw.pop("lora_dropout")
    layer = lora_layer("linear", "none", p, dtype=torch.float32, **kw)
    calls = counting_calls(monkeypatch)
    run(layer, torch.randn(5, 24), torch.randn(5, 40))
    assert not calls


def test_dropped_positions_are_independent_drops_with_probability_p():
    torch.manual_seed(0)
    n, p = 1_000_000, 0.05
    pos = dropped_positions(n, p)
    assert pos.numel() == pos.unique().numel() and int(pos.min()) >= 0 and int(pos.max()) < n
    assert abs(pos.numel() / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    gaps = torch.diff(pos)
    k = gaps.numel()
    for gap in (1, 2, 10):  # P(gap = j) = (1 - p)^(j - 1) p
        expected = (1 - p) ** (gap - 1) * p
        assert abs((gaps == gap).double().mean().item() - expected) < 5 * math.sqrt(expected / k)
    # extreme rates: everything dropped, and (almost surely) nothing
    assert dropped_positions(10, 0.999999).numel() == 10
    assert dropped_positions(3, 1e-6).numel() == 0  # P(any drop) = 3e-6; the seed is fixed above


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_keeps_no_dense_weight_for_backward(kind):
    """QLoRA's point: the dequantized weight is a temporary in forward and is dequantized again in
    backward; nothing of shape (out, in) is saved between them."""
    layer = lora_layer(kind, "none", 0.1, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(torch.randn(6, 24, requires_grad=True))
    assert saved and (40, 24) not in saved and (24, 40) not in saved
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
