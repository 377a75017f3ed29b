"""VeraLinear and inject_vera on their own: the merge invariants (a hypothesis property), the seeded projections,
the layout with the model as its own holder, deletion, Conv1D / quantized bases, dropout, and the one-line errors."""
import dataclasses
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft.tuners.vera.model import _kaiming_init  # noqa: E402
from torch import nn  # noqa: E402

from peftcore.lora.layer import Adapter  # noqa: E402
from peftcore.models.layers import Conv1D  # noqa: E402
from peftcore.models.quantized import QuantLinear  # noqa: E402
from peftcore.vera import BufferDict, VeraConfig, VeraLinear, inject_vera, make_projections  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


class Block(nn.Module):
    """An attention-like block with transformers' module names, and two modules VeRA cannot take."""

    def __init__(self, dim: int = 8, hidden: int = 12):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, 4, bias=False), nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm, self.act = nn.LayerNorm(dim), nn.SiLU()

    def forward(self, x):
        h = self.norm(x)
        h = self.q_proj(h) * self.k_proj(h).mean(-1, keepdim=True) + self.v_proj(h)
        return h + self.down_proj(self.act(self.up_proj(h)))


def block(**kwargs) -> Block:
    torch.manual_seed(0)
    return Block(**kwargs).eval()


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.add_(torch.randn_like(p))


def vera(base: nn.Module, r: int = 4, key: int = 0, **kwargs) -> VeraLinear:
    """One VeraLinear around `base`, its own projections, the adapter perturbed."""
    in_f, out_f = (base.weight.shape if isinstance(base, Conv1D) else (base.in_features, base.out_features))
    A, B = make_projections(r, in_f, out_f, key)
    vera_A, vera_B = BufferDict(), BufferDict()
    vera_A["default"], vera_B["default"] = A, B
    layer = VeraLinear(base, vera_A, vera_B)
    layer.add_adapter("default", VeraConfig(r=r, init_weights=False, **kwargs))
    return layer


@settings(max_examples=10, deadline=None)
@given(in_f=st.integers(1, 9), out_f=st.integers(1, 9), r=st.integers(1, 6), key=st.integers(0, 2**31 - 1),
       conv1d=st.booleans(), rows=st.integers(1, 3))
def test_merge_round_trip_and_projections_equal_peft_for_drawn_shapes(in_f, out_f, r, key, conv1d, rows):
    generator = torch.Generator().manual_seed(key)  # PEFT's draws, in its order, from the same key
    assert torch.equal(make_projections(r, in_f, out_f, key)[0], _kaiming_init((r, in_f), generator=generator))
    assert torch.equal(make_projections(r, in_f, out_f, key)[1], _kaiming_init((out_f, r), generator=generator))
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    layer = vera(base, r, key)
    x = torch.randn(rows, 2, in_f)
    W = base.weight.detach().clone()
    unmerged = layer(x)
    dense = W.T if conv1d else W  # (out, in)
    delta = layer.delta_weight("default").detach()
    assert delta.shape == W.shape
    assert_close(unmerged, x @ (dense + (delta.T if conv1d else delta)).T + base.bias.detach())
    layer.merge()
    assert_close(base.weight.detach() - W, delta)
    assert_close(layer(x), unmerged)
    layer.unmerge()
    assert_close(base.weight.detach(), W)
    assert not layer.merged_adapters


def test_the_model_is_its_own_holder_by_default_with_peft_s_keys_under_base_model():
    hf = peft.get_peft_model(block(), peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"]))
    model = block()
    wrapped = inject_vera(model, VeraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"]), "default")
    assert sorted(wrapped) == ["down_proj", "q_proj", "up_proj"]
    theirs = {k.removeprefix("model."): v for k, v in hf.base_model.state_dict().items()}
    assert set(model.state_dict()) == set(theirs)
    assert model.q_proj.vera_A is model.vera_A and model.down_proj.vera_B is model.vera_B  # shared, not copied
    assert tuple(model.vera_A["default"].shape) == (4, 12) and tuple(model.vera_B["default"].shape) == (12, 4)
    assert isinstance(model.q_proj, Adapter)


def test_delete_adapter_drops_its_vectors_and_shared_projections():
    model = block()
    inject_vera(model, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), "default")
    inject_vera(model, VeraConfig(r=4, target_modules=["q_proj"]), "other")
    assert "q_proj.vera_lambda_d.other" in model.state_dict() and "vera_A.other" in model.state_dict()
    model.q_proj.merge(["other"])
    with pytest.raises(ValueError, match="merged into the base weight; unmerge before deleting it"):
        model.q_proj.delete_adapter("other")
    model.q_proj.unmerge()
    for layer in (model.q_proj, model.v_proj):
        layer.delete_adapter("other")
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(".other")] and "vera_A.default" in keys
    assert model.q_proj.active_adapters == [] and list(model.q_proj.adapter_params("other")) == []


def test_our_conv1d_and_a_quantized_base_compute_what_the_dense_linear_does():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    conv = Conv1D(5, 6)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T), conv.bias.copy_(linear.bias)
    quant = QuantLinear.from_linear(linear, "int8")
    dense = nn.Linear(6, 5)
    with torch.no_grad():
        dense.weight.copy_(quant.dequantize()), dense.bias.copy_(linear.bias)
    x = torch.randn(3, 6)
    layers = {}
    for name, base in {"linear": linear, "conv": conv, "quant": quant, "dense": dense}.items():
        torch.manual_seed(4)  # the same lambda_d draw for each
        layers[name] = vera(base)
    assert_close(layers["conv"](x), layers["linear"](x))
    assert_close(layers["conv"].delta_weight("default"), layers["linear"].delta_weight("default").T)
    assert_close(layers["quant"](x), layers["dense"](x))
    assert (layers["quant"](x) - quant(x)).abs().max() > 1e-3
    with pytest.raises(TypeError, match="cannot merge VeRA into a quantized base layer"):
        layers["quant"].merge()


def test_dropout_applies_to_the_adapter_input_in_training_only():
    layer = vera(nn.Linear(6, 5), vera_dropout=0.5)
    x = torch.randn(4, 6)
    layer.train()
    torch.manual_seed(9)
    out = layer(x)
    torch.manual_seed(9)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.projections("default")
    lambda_b, lambda_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    assert_close(out, layer.base_layer(x) + lambda_b * ((lambda_d * (dropped @ A.T)) @ B.T))
    layer.eval()
    assert_close(layer(x), layer.base_layer(x) + lambda_b * ((lambda_d * (x @ A.T)) @ B.T))


def test_disabled_and_merged_states():
    layer = vera(nn.Linear(6, 5))
    x = torch.randn(2, 6)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.merge()
    with pytest.raises(RuntimeError, match="mixed-adapter batch needs unmerged adapters"):
        layer(x, adapter_names=["default", "__base__"])
    layer.disable_adapters = True
    with pytest.raises(RuntimeError, match="unmerge before disabling them"):
        layer(x)


def test_config_fields_and_defaults_equal_peft_and_read_peft_s_json():
    ours, theirs = VeraConfig(target_modules=["q_proj"]).to_dict(), peft.VeraConfig(target_modules=["q_proj"]).to_dict()
    assert set(ours) == set(theirs) - {"auto_mapping"}
    for key in ours:
        expected = theirs[key].value if hasattr(theirs[key], "value") else theirs[key]
        assert ours[key] == (sorted(expected) if isinstance(expected, set) else expected), key
    saved = json.loads(json.dumps({**theirs, "peft_type": "VERA", "target_modules": ["q_proj"], "r": 16}))
    assert dataclasses.asdict(VeraConfig.from_dict(saved)) == dataclasses.asdict(VeraConfig(target_modules=["q_proj"],
                                                                                             r=16))


def add(model, name="default", **kwargs):
    return inject_vera(model, VeraConfig(**{"r": 4, "target_modules": ["q_proj"], **kwargs}), name)


@pytest.mark.parametrize("make, error, message", [
    (lambda: VeraConfig(r=0), ValueError, "r must be a positive integer"),
    (lambda: VeraConfig(bias="lora_only"), ValueError, "bias must be one of 'none', 'all', 'vera_only'"),
    (lambda: VeraConfig(vera_dropout=1.5), ValueError, "vera_dropout is a probability in"),
    (lambda: VeraConfig(layers_pattern="layers"), ValueError, "layers_pattern only applies together with"),
    (lambda: add(block(), target_modules=None), ValueError, "target_modules is required"),
    (lambda: add(block(), target_modules=["o_proj"]), ValueError,
     r"matched no module of Block\. Candidates: down_proj, k_proj, q_proj, up_proj, v_proj"),
    (lambda: add(block(), target_modules=["q_proj", "norm"]), TypeError, "'norm' is a LayerNorm; VeRA adapts"),
    (lambda: inject_vera(nn.Sequential(nn.Linear(4, 4)), VeraConfig(r=2, target_modules=["0"]), "default"), TypeError,
     "cannot live on a Sequential, which would run or list them with its layers: pass holder="),
], ids=["r", "bias", "dropout", "layers_pattern", "no_targets", "no_match", "not_linear", "sequential_holder"])
def test_bad_options_raise_one_line_errors(make, error, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message) as err:
            make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(projection_prng_key=5), "were drawn with 0: every VeRA adapter of a model shares them"),
    (dict(save_projection=False), "saved for all adapters or none"),
    (dict(r=2), "r=2 differs from the shared VeRA projections' r=4"),
    (dict(name="default"), "has a VeRA adapter named 'default' already"),
], ids=["prng_key", "save_projection", "r", "duplicate_name"])
def test_a_second_adapter_that_disagrees_with_the_first_is_refused_and_nothing_changes(kwargs, message):
    model = block()
    add(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = kwargs.pop("name", "other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message) as err:
            add(model, name, **kwargs)
    assert "\n" not in str(err.value)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
