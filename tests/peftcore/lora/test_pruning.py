import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from peftcore import LoraConfig, get_peft_model
from peftcore.lora.pruning import format_sparsity_report, prune_model, two_four_mask, unstructured_mask
from peftcore.models import Conv1D


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


@given(rows=st.integers(1, 9), cols=st.integers(1, 23), sparsity=st.floats(0.0, 0.95))
def test_unstructured_keeps_exactly_the_largest(rows, cols, sparsity):
    w = torch.randn(rows, cols)
    mask = unstructured_mask(w, sparsity)
    keep = round(w.numel() * (1 - sparsity))
    assert int(mask.sum()) == keep
    if 0 < keep < w.numel():  # every kept magnitude >= every dropped one
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


@given(rows=st.integers(1, 6), groups=st.integers(1, 6))
def test_two_four_keeps_two_largest_of_every_four(rows, groups):
    w = torch.randn(rows, groups * 4)
    mask = two_four_mask(w).view(rows, groups, 4)
    assert (mask.sum(-1) == 2).all()
    mags = w.abs().view(rows, groups, 4)
    kept_min = mags.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = mags.masked_fill(mask, -1.0).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_prune_model_report_and_weights():
    model = tiny_model()
    report = prune_model(model, sparsity=0.5)
    assert set(report["layers"]) == {"0", "2"}
    assert report["overall"] == pytest.approx(0.5, abs=0.01)
    assert (model[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    text = format_sparsity_report(report)
    assert "overall (unstructured)" in text and "50.00%" in text


def test_two_four_on_conv1d_prunes_along_inputs():
    conv = Conv1D(6, 8)  # weight (in=8, out=6)
    report = prune_model(nn.Sequential(conv), pattern="2:4")
    assert report["overall"] == pytest.approx(0.5)
    assert ((conv.weight.T.reshape(6, 2, 4) != 0).sum(-1) == 2).all()


def test_prune_sees_through_lora_and_leaves_adapters_alone():
    pm = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    a_before = pm.model[0].lora_A["default"].weight.clone()
    report = prune_model(pm, sparsity=0.25)
    assert any(name.endswith("0.base_layer") for name in report["layers"])
    assert not any(".lora_" in name for name in report["layers"])
    torch.testing.assert_close(pm.model[0].lora_A["default"].weight, a_before)


def test_bad_inputs():
    with pytest.raises(ValueError, match="pattern"):
        prune_model(tiny_model(), pattern="3:7")
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_model(tiny_model(), sparsity=1.5)
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_mask(torch.randn(3, 6))
    with pytest.raises(ValueError, match="no prunable linear"):
        prune_model(nn.Sequential(nn.ReLU()))


def test_transformers_gpt2_conv1d_weights_are_pruned_along_their_input_dimension():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    report = prune_model(model, pattern="2:4")
    c_attn = model.transformer.h[0].attn.c_attn.weight  # transformers' Conv1D: (in, out)
    assert "transformer.h.0.attn.c_attn" in report["layers"]
    assert ((c_attn.T.reshape(48, 4, 4) != 0).sum(-1) == 2).all()  # 2 of every 4 consecutive inputs kept
