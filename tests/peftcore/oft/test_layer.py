"""OFT layers on their own: several adapters, mixed-adapter batches, the rotation's math, rotation_angle, quantized
bases, adapter bookkeeping."""
import copy
import math

import peft
import pytest
import torch
from torch import nn

from peftcore.models.quantized import QuantLinear
from peftcore.oft import OFTConfig, OftEmbedding, OftLinear, block_angles, inject_oft, rotation_angle
from peftcore.oft.layer import cayley, cayley_neumann, coft_project, neumann_coefficients, skew_symmetric
from tests.peftcore.oft.common import block, ids, merge_all, oft_layers, perturb, unmerge_all
from tests.tolerances import assert_close

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"]


def two_adapters(base):
    """(PEFT's model, ours) each with adapters "default" and "other" (both perturbed, PEFT's copied into ours)."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(target_modules=TARGETS, oft_block_size=4))
    theirs.add_adapter("other", peft.OFTConfig(target_modules=TARGETS, oft_block_size=8, use_cayley_neumann=False))
    perturb(theirs)
    ours = copy.deepcopy(base)
    inject_oft(ours, OFTConfig(target_modules=TARGETS, oft_block_size=4), "default")
    inject_oft(ours, OFTConfig(target_modules=TARGETS, oft_block_size=8, use_cayley_neumann=False), "other")
    ours.load_state_dict(theirs.base_model.model.state_dict())
    return theirs, ours


def set_active(model, names):
    for layer in oft_layers(model).values():
        layer.active_adapters = list(names)


def test_several_active_adapters_rotate_in_turn_as_peft():
    base = block()
    theirs, ours = two_adapters(base)
    x = ids()
    theirs.base_model.set_adapter(["default", "other"])
    set_active(ours, ["default", "other"])
    both = ours(x)
    assert_close(both, theirs(x))
    set_active(ours, ["other"])
    assert (ours(x) - both).abs().max() > 1e-2  # the second adapter is not a no-op on top of the first


def test_merging_two_adapters_keeps_the_forward_where_peft_does_not():
    """Our merge composes the rotations in the forward's order; HF PEFT 0.21.2 merges first-named first, which for two
    non-commuting rotations gives a model that no longer computes its own unmerged forward (the deviation)."""
    base = block()
    theirs, ours = two_adapters(base)
    x = ids()
    theirs.base_model.set_adapter(["default", "other"])
    set_active(ours, ["default", "other"])
    unmerged = ours(x)
    weight = oft_layers(ours)["q_proj"].base_layer.weight.detach().clone()
    merge_all(ours)
    assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-4)
    theirs.merge_adapter()
    assert (theirs(x) - unmerged).abs().max() > 1e-2  # PEFT's merged model has moved away from the forward
    unmerge_all(ours)
    assert_close(oft_layers(ours)["q_proj"].base_layer.weight, weight, atol=1e-5, rtol=1e-4)
    assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_mixed_adapter_batch_equals_per_adapter_runs(kind):
    base = block()
    _, ours = two_adapters(base)
    layer = oft_layers(ours)["q_proj" if kind == "linear" else "embed_tokens"]
    x = torch.randn(4, 3, 16) if kind == "linear" else ids(4, 3)
    names = ["other", "__base__", "default", "other"]
    mixed = layer(x, adapter_names=names)
    for row, name in enumerate(names):
        layer.active_adapters = [] if name == "__base__" else [name]
        assert_close(mixed[row], layer(x)[row])
    layer.active_adapters = ["default"]
    assert (mixed[0] - layer(x)[0]).abs().max() > 1e-3  # the rows did take different adapters
    with pytest.raises(ValueError, match="4 entries for a batch of 2"):
        layer(x[:2], adapter_names=names)


def test_exact_cayley_is_orthogonal_and_neumann_approximates_its_transpose():
    torch.manual_seed(0)
    b = 6
    rows, cols = torch.triu_indices(b, b, 1)
    S = skew_symmetric(torch.randn(3, b * (b - 1) // 2, dtype=torch.float64) * 0.05, rows, cols, b)
    assert torch.equal(S, -S.transpose(-1, -2))
    R = cayley(S)
    eye = torch.eye(b, dtype=torch.float64).expand_as(R)
    assert_close(R @ R.transpose(-1, -2), eye, dtype=torch.float32, atol=1e-12, rtol=0)  # fp64: far below fp32's row
    # the series approximates (I + S)(I - S)^-1 = R^T; its error shrinks with more terms
    errors = [(cayley_neumann(S, n) - R.transpose(-1, -2)).abs().max() for n in (2, 5, 9)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_neumann_coefficients_follow_peft_loop():
    assert neumann_coefficients(1) == [1.0]
    assert neumann_coefficients(2) == [1.0, 2.0]
    assert neumann_coefficients(3) == neumann_coefficients(4) == [1.0, 2.0, 2.0, 1.0]
    assert neumann_coefficients(6) == [1.0, 2.0, 2.0, 2.0, 2.0, 1.0]


def test_coft_projection_caps_the_skew_norm():
    vec = torch.tensor([[3.0, 4.0, 0.0], [1e-6, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = coft_project(vec, eps=0.1)
    radius = 0.1 / math.sqrt(3)
    assert_close(math.sqrt(2) * out[0].norm(), torch.tensor(radius))  # ||S||_F = sqrt(2) ||v|| is pulled in
    assert_close(out[0] / out[0].norm(), vec[0] / vec[0].norm())  # direction kept
    assert torch.equal(out[1:], vec[1:])  # inside the ball (or zero): unchanged


def test_rotation_angle_is_zero_at_init_and_recovers_a_known_plane_rotation():
    layer = OftLinear(nn.Linear(4, 3))
    layer.add_adapter("default", OFTConfig(oft_block_size=2, use_cayley_neumann=False))
    assert rotation_angle(layer, "default") == 0.0
    theta = 0.7
    with torch.no_grad():  # a 2x2 block with v = a is the Cayley rotation by 2 atan(a)
        layer.oft_R["default"].weight.copy_(torch.tensor([[math.tan(theta / 2)], [0.0]]))
    assert rotation_angle(layer, "default") == pytest.approx(theta, abs=1e-6)
    assert_close(block_angles(layer, "default"), torch.tensor([theta, 0.0]), atol=1e-6, rtol=0)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # the plane's first axis turns by exactly theta
    turned = layer.oft_R["default"](x).detach()
    assert math.acos(float(turned[0, :2] @ x[0, :2])) == pytest.approx(theta, abs=1e-6)
    assert rotation_angle(layer, "default") == pytest.approx(theta, abs=1e-6)


def test_quantized_base_rotates_its_input_and_refuses_merging():
    torch.manual_seed(0)
    quant = QuantLinear.from_linear(nn.Linear(16, 8), "int8")
    layer = OftLinear(quant)
    layer.add_adapter("default", OFTConfig(oft_block_size=4, init_weights=False))
    x = torch.randn(2, 16)
    assert_close(layer(x), quant(x @ layer.rotation_matrix("default")))
    assert (layer(x) - quant(x)).abs().max() > 1e-2
    with pytest.raises(TypeError, match="quantized"):
        layer.merge()


def test_delete_adapter_and_disable_adapters():
    base = block()
    _, ours = two_adapters(base)
    layer = oft_layers(ours)["v_proj"]
    x = torch.randn(2, 16)
    layer.disable_adapters = True
    assert_close(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.active_adapters = ["default", "other"]
    layer.merge(["other"])
    with pytest.raises(ValueError, match="unmerge before deleting"):
        layer.delete_adapter("other")
    layer.disable_adapters = True
    with pytest.raises(RuntimeError, match="unmerge before disabling"):
        layer(x)
    layer.disable_adapters = False
    with pytest.raises(RuntimeError, match="mixed-adapter batch needs unmerged"):
        layer(x, adapter_names=["other", "default"])
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(["other"])
    with pytest.raises(TypeError, match="list of adapter names"):
        layer.merge("other")
    layer.unmerge()
    layer.delete_adapter("other")
    assert list(layer.oft_R) == ["default"] and layer.active_adapters == ["default"]
    assert "other" not in layer.r and "other" not in layer.oft_block_size


def test_layers_satisfy_the_adapter_protocol():
    from peftcore.lora.layer import Adapter

    assert isinstance(OftLinear(nn.Linear(4, 4)), Adapter) and isinstance(OftEmbedding(nn.Embedding(3, 4)), Adapter)


def test_embedding_layer_matches_the_formula():
    emb = nn.Embedding(10, 8)
    layer = OftEmbedding(emb)
    layer.add_adapter("default", OFTConfig(oft_block_size=4, init_weights=False))
    tokens = torch.tensor([[1, 5, 9]])
    assert_close(layer(tokens), emb(tokens) @ layer.rotation_matrix("default"))
    assert [p.shape for p in layer.adapter_params("default")] == [torch.Size([2, 6])]
