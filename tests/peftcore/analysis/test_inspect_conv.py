"""`inspect` on conv LoRA adapters: the spectra are those of the adapter's dense weight (out, in * prod kernel),
checked against torch.linalg.svdvals of the dense reshaped delta (PEFT's get_delta_weight where it has one; the
grouped conv's dense weight, checked first to reproduce the adapter's output)."""
import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from peftcore import LoraConfig, get_peft_model
from peftcore.analysis.lowrank import compare_adapters, inspect_adapter
from tests.peftcore.lora.test_conv import CONVS, Convs

UNGROUPED = [c for c in CONVS if c != "g2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """-> (our DoRA model, its folder, the base folder, a second adapter's folder, PEFT's folder, PEFT's model)."""
    torch.manual_seed(0)
    base = Convs().eval()
    root = tmp_path_factory.mktemp("conv_inspect")
    (root / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, root / "base" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grouped conv cannot be merged: both libraries say so
        torch.manual_seed(1)
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=CONVS,
                                                              init_lora_weights=False, use_dora=True))
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.1)
        ours.save_pretrained(root / "ours")
        torch.manual_seed(2)
        get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=CONVS, init_lora_weights=False)
                       ).save_pretrained(root / "second")
        torch.manual_seed(3)
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CONVS,
                                                                             init_lora_weights=False))
        reference.save_pretrained(root / "peft")
    return ours, root / "ours", root / "base", root / "second", root / "peft", reference


def by_module(stats):
    return {s.module: s for s in stats}


def svdvals(delta: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svdvals(delta.detach().double().flatten(1))[:r]


def test_singular_values_equal_those_of_the_dense_reshaped_delta(saved):
    ours, folder, *_ = saved
    stats = by_module(inspect_adapter(folder))
    assert set(stats) == set(CONVS)
    for conv in UNGROUPED:
        dense = ours.model.get_submodule(conv).delta_weight("default").detach()
        got = torch.tensor(stats[conv].singular_values, dtype=torch.float64)
        torch.testing.assert_close(got, svdvals(dense, 4), rtol=1e-5, atol=1e-7)
        assert stats[conv].delta_fro == pytest.approx(float(torch.linalg.norm(dense.double())), rel=1e-5)


def test_a_grouped_conv_is_measured_as_the_dense_conv_it_is(saved):
    ours, folder, *_ = saved
    layer = ours.model.g2
    dense = layer.dense_delta("default").detach()
    assert dense.shape == (8, 8, 3, 3)  # every input channel: not the base's (8, 4, 3, 3)
    x = torch.randn(2, 8, 5, 4)
    with torch.no_grad():
        adapter = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(F.conv2d(x, dense, padding=1), adapter, rtol=1e-5, atol=1e-6)
    s = by_module(inspect_adapter(folder))["g2"]
    torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64), svdvals(dense, 4),
                               rtol=1e-5, atol=1e-7)


def test_with_the_base_the_ratios_use_the_conv_weight(saved):
    ours, folder, base, *_ = saved
    stats = by_module(inspect_adapter(folder, base))
    for conv in CONVS:
        layer = ours.model.get_submodule(conv)
        W = layer.base_layer.weight.detach().double()
        dense = layer.dense_delta("default").detach().double()
        assert stats[conv].relative_delta == pytest.approx(float(dense.norm() / W.norm()), rel=1e-5)
        m = layer.lora_magnitude_vector["default"].weight.detach().double().flatten()
        rows = W.flatten(1).norm(dim=1)
        assert stats[conv].magnitude_change["mean"] == pytest.approx(float(((m - rows) / rows).mean()), rel=1e-5)
    # the amplification factor against the dense form of the grouped base (checked to be that conv first)
    g2 = ours.model.g2.base_layer
    W = g2.weight.detach().double()
    W_dense = torch.zeros(8, 8, 3, 3, dtype=torch.float64)
    W_dense[:4, :4], W_dense[4:, 4:] = W[:4], W[4:]
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, W_dense, padding=1), F.conv2d(x, W, padding=1, groups=2))
    U, S, Vh = torch.linalg.svd(ours.model.g2.dense_delta("default").detach().double().flatten(1))
    expected = S[:4].norm() / (U[:, :4].T @ W_dense.flatten(1) @ Vh[:4].T).norm()
    assert stats["g2"].amplification == pytest.approx(float(expected), rel=1e-5)


def test_a_peft_conv_adapter_gives_peft_delta_spectra(saved):
    *_, peft_folder, reference = saved
    stats = by_module(inspect_adapter(peft_folder))
    for conv in UNGROUPED:
        delta = reference.base_model.model.get_submodule(conv).get_delta_weight("default")
        torch.testing.assert_close(torch.tensor(stats[conv].singular_values, dtype=torch.float64), svdvals(delta, 4),
                                   rtol=1e-5, atol=1e-7)


def test_conv_adapters_compare(saved):
    _, folder, _, second, *_ = saved
    grids = compare_adapters(folder, second)
    assert set(grids) == set(CONVS) and all(len(g) == 4 and len(g[0]) == 2 for g in grids.values())


def test_a_base_whose_conv_has_another_shape_is_named(saved, tmp_path):
    ours, folder, *_ = saved
    weights = {f"{c}.weight": ours.model.get_submodule(c).base_layer.weight.detach().clone() for c in CONVS}
    weights["c2.weight"] = torch.zeros(8, 3, 3, 3)  # the adapter is for a 3x1 kernel
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"c2.weight has shape \(8, 3, 3, 3\).*\(8, 3, 3, 1\) weight"):
        inspect_adapter(folder, tmp_path)
