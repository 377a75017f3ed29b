"""LoRA / DoRA invariants as hypothesis properties on tiny shapes (our own models only, no transformers).

Layer level: identity inits, PiSSA / OLoRA, merge / unmerge, DoRA's low-rank row norm.
Model level (a tiny random Llama): save/load, mixed-adapter batches, training touches only the
adapter, set_adapter / disable_adapter / delete_adapter.
"""
import tempfile

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.lora.layer import LoraEmbedding, LoraLinear, dora_row_norm
from peftcore.models import Conv1D, from_config
from peftcore.models.llama import LlamaConfig
from tests.tolerances import assert_close

KINDS = ("linear", "conv1d", "embedding")


# -- layers ---------------------------------------------------------------------------------------
@st.composite
def layer_specs(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    use_dora = draw(st.booleans())
    return dict(
        kind=kind, n_in=draw(st.integers(1, 9)), n_out=draw(st.integers(1, 9)), r=draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from([1.0, 2.5, 8.0])), use_dora=use_dora, use_rslora=draw(st.booleans()),
        lora_bias=kind != "embedding" and not use_dora and draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def base_layer(spec) -> nn.Module:
    """nn.Linear(in, out), GPT-2's Conv1D (stored (in, out)), or nn.Embedding(vocab=in, dim=out)."""
    torch.manual_seed(spec["seed"])
    if spec["kind"] == "embedding":
        return nn.Embedding(spec["n_in"], spec["n_out"])
    base = nn.Linear(spec["n_in"], spec["n_out"]) if spec["kind"] == "linear" else Conv1D(spec["n_out"], spec["n_in"])
    with torch.no_grad():
        base.bias.normal_()  # Conv1D starts with a zero bias
    return base


def add_adapter(layer, spec, name="a", init=False, use_dora=None):
    use_dora = spec["use_dora"] if use_dora is None else use_dora
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], init_lora_weights=init, use_dora=use_dora,
                        use_rslora=spec["use_rslora"], lora_bias=spec["lora_bias"] and not use_dora)
    layer.add_adapter(name, config, spec["r"], spec["alpha"])
    with torch.no_grad():  # a DoRA magnitude equal to the weight norm would make its factor 1
        for p in layer.lora_magnitude_vector[name].parameters() if name in layer.lora_magnitude_vector else ():
            p.mul_(1 + 0.2 * torch.rand_like(p))
        if layer_bias(layer, name) is not None:
            layer_bias(layer, name).normal_()
    return layer


def layer_bias(layer, name):
    return layer.lora_B[name].bias if isinstance(layer, LoraLinear) else None


def adapted(spec, **kwargs):
    base = base_layer(spec)
    layer = LoraEmbedding(base) if spec["kind"] == "embedding" else LoraLinear(base)
    return add_adapter(layer, spec, **kwargs)


def layer_input(spec):
    if spec["kind"] == "embedding":
        return torch.randint(0, spec["n_in"], (2, 3))
    return torch.randn(2, 3, spec["n_in"])


@settings(deadline=None)
@given(spec=layer_specs(), init=st.sampled_from([True, "gaussian"]))
def test_identity_inits_give_the_base_output(spec, init):
    layer = adapted(dict(spec, lora_bias=False), init=init, use_dora=spec["use_dora"])
    if spec["use_dora"]:  # undo the magnitude perturbation: a fresh DoRA adapter starts at identity too
        with torch.no_grad():
            W = layer.base_layer.weight
            norm = layer.dora_norm(W, "a") if spec["kind"] == "embedding" else dora_row_norm(
                W.T if spec["kind"] == "conv1d" else W, layer.lora_A["a"].weight, layer.lora_B["a"].weight,
                layer.scaling["a"])
            layer.lora_magnitude_vector["a"].weight.copy_(norm)
    x = layer_input(spec)
    with torch.no_grad():
        assert_close(layer(x), layer.base_layer(x))


@settings(deadline=None)
@given(spec=layer_specs())
def test_random_init_changes_the_output(spec):
    """The guard for the test above: an adapter whose both factors are random must show."""
    layer = adapted(spec, init=False)
    x = layer_input(spec)
    with torch.no_grad():
        assert (layer(x) - layer.base_layer(x)).abs().max() > 1e-4


@settings(deadline=None)
@given(spec=layer_specs(kinds=("linear", "conv1d")), scheme=st.sampled_from(["pissa", "pissa_niter_2", "olora"]))
def test_pissa_and_olora_move_the_top_part_into_the_adapter(spec, scheme):
    spec = dict(spec, r=min(spec["r"], spec["n_in"], spec["n_out"]), lora_bias=False)
    base = base_layer(spec)
    W = base.weight.detach().clone()
    x = layer_input(spec)
    with torch.no_grad():
        expected = base(x)
        layer = LoraLinear(base)
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], init_lora_weights=scheme,
                            use_rslora=spec["use_rslora"], use_dora=spec["use_dora"])
        layer.add_adapter("a", config, spec["r"], spec["alpha"])
        assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # residual + s*B*A == W up to an SVD's rounding
        assert (base.weight - W).abs().max() > 1e-4 and layer.lora_B["a"].weight.abs().max() > 1e-4


def spec(kind, use_dora=False, lora_bias=False):
    return dict(kind=kind, n_in=5, n_out=3, r=2, alpha=2.5, use_dora=use_dora, use_rslora=False, lora_bias=lora_bias,
                seed=1)


@settings(deadline=None)
@given(spec=layer_specs())
@example(spec=spec("linear", lora_bias=True))  # every kind and variant runs, whatever the profile draws
@example(spec=spec("conv1d", lora_bias=True))
@example(spec=spec("linear", use_dora=True))
@example(spec=spec("conv1d", use_dora=True))
@example(spec=spec("embedding", use_dora=True))
@example(spec=spec("embedding"))
def test_merged_equals_unmerged_and_unmerge_restores_the_weight(spec):
    layer = adapted(spec)
    x = layer_input(spec)
    W, bias = layer.base_layer.weight.detach().clone(), getattr(layer.base_layer, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert (layer.base_layer.weight - W).abs().max() > 1e-5
        assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-4)
        layer.unmerge()
        assert_close(layer.base_layer.weight, W)
        if bias is not None:
            assert_close(layer.base_layer.bias, bias)
        assert_close(layer(x), unmerged)


@settings(deadline=None)
@given(spec=layer_specs(), second_dora=st.booleans())
def test_two_merged_adapters_equal_both_active(spec, second_dora):
    """DoRA's norm must come from the base weight without the adapters merged before it, as in forward.

    (A DoRA adapter after one with lora_bias scales that bias in forward, as in PEFT, but not when
    merged: that pairing is left out.)
    """
    spec = dict(spec, lora_bias=spec["lora_bias"] and not second_dora)
    layer = add_adapter(adapted(spec), spec, name="b", use_dora=second_dora)
    layer.active_adapters = ["a", "b"]
    x = layer_input(spec)
    with torch.no_grad():
        both = layer(x)
        layer.merge(["a", "b"])
        assert_close(layer(x), both, atol=1e-4, rtol=1e-4)


@settings(deadline=None)
@given(n_out=st.integers(1, 12), n_in=st.integers(1, 12), r=st.integers(1, 6), s=st.floats(-4, 4),
       seed=st.integers(0, 2**16))
def test_dora_row_norm_equals_the_dense_norm(n_out, n_in, r, s, seed):
    g = torch.Generator().manual_seed(seed)
    W, A, B = (torch.randn(shape, generator=g) for shape in ((n_out, n_in), (r, n_in), (n_out, r)))
    assert_close(dora_row_norm(W, A, B, s), torch.linalg.norm(W + s * B @ A, dim=1), atol=1e-4, rtol=1e-4)


# -- models ---------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True, initializer_range=0.2)
    model = from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and norm scales away from 0 / 1
    return model


@st.composite
def lora_configs(draw):
    modules_to_save = draw(st.sampled_from([None, ["lm_head"], ["model.norm"]]))
    choices = [t for t in TARGETS if not (modules_to_save and t in modules_to_save[0])]
    return LoraConfig(
        target_modules=draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4, unique=True)),
        r=draw(st.integers(1, 4)), lora_alpha=draw(st.sampled_from([1, 4, 16])), use_dora=draw(st.booleans()),
        use_rslora=draw(st.booleans()), bias=draw(st.sampled_from(["none", "all", "lora_only"])),
        modules_to_save=modules_to_save, init_lora_weights=False,
    )


def perturb_trainable(pm):
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


IDS = torch.tensor([[3, 9, 1, 30, 7], [2, 2, 5, 11, 36], [8, 0, 4, 19, 23]])


@settings(deadline=None)
@given(config=lora_configs())
def test_save_load_round_trip_is_bitwise(config):
    pm = get_peft_model(tiny_llama(), config)
    perturb_trainable(pm)
    with tempfile.TemporaryDirectory() as folder:
        pm.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    expected = pm.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(IDS), pm(IDS))


def allowed_trainable(name: str, config: LoraConfig, adapter: str) -> bool:
    if f".{adapter}." in name or name.endswith(f".{adapter}"):
        return "lora_" in name or ".modules_to_save." in name
    if config.bias == "all":
        return name.endswith(".bias") and "original_module" not in name and "lora_" not in name
    return config.bias == "lora_only" and name.endswith(".base_layer.bias")


@settings(deadline=None)
@given(config=lora_configs())
def test_only_the_active_adapter_and_selected_biases_train(config):
    pm = get_peft_model(tiny_llama(), config, adapter_name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj", "down_proj"], r=2, modules_to_save=["model.norm"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert all(allowed_trainable(n, config, "a") for n in trainable), sorted(trainable)
    own = {n for n, _ in pm.named_parameters() if ".a." in n or n.endswith(".a")}
    assert own and own <= trainable  # every tensor of the active adapter trains
    assert not any(".b." in n for n in trainable)
    if config.bias != "none":
        assert any(n.endswith(".bias") and ".a." not in n for n in trainable)


@settings(deadline=None)
@given(config=lora_configs())
def test_an_adamw_step_moves_the_adapter_and_leaves_the_base_alone(config):
    pm = get_peft_model(tiny_llama(), config).train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: frozen ones get no grad
    pm(IDS).square().mean().backward()
    optimizer.step()
    for name, p in pm.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


@pytest.fixture(scope="module")
def two_adapters():
    """Adapter "a": LoRA + a trained lm_head copy; "b": DoRA, on an embedding too; both random."""
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], r=2,
                                                 modules_to_save=["lm_head"], init_lora_weights=False),
                        adapter_name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["v_proj", "o_proj", "up_proj", "embed_tokens"], r=3, lora_alpha=6,
                                   use_dora=True, init_lora_weights=False))
    for name in ("a", "b"):
        pm.set_adapter(name)
        perturb_trainable(pm)
    return pm.eval()


@torch.no_grad()
def run(pm, name, ids):
    if name == "__base__":
        with pm.disable_adapter():
            return pm(ids)
    pm.set_adapter(name)
    return pm(ids)


@settings(deadline=None)
@given(names=st.lists(st.sampled_from(["a", "b", "__base__"]), min_size=1, max_size=5))
def test_mixed_batch_equals_per_adapter_runs(two_adapters, names):
    ids = torch.randint(0, 37, (len(names), 4), generator=torch.Generator().manual_seed(len(names)))
    with torch.no_grad():
        mixed = two_adapters(ids, adapter_names=names)
    for row, name in enumerate(names):
        assert_close(mixed[row], run(two_adapters, name, ids[row:row + 1])[0])


def test_set_adapter_switches_and_disable_adapter_gives_the_base(two_adapters):
    ids = IDS
    a, b, base = (run(two_adapters, n, ids) for n in ("a", "b", "__base__"))
    assert (a - b).abs().max() > 1e-3 and (a - base).abs().max() > 1e-3 and (b - base).abs().max() > 1e-3
    assert_close(run(two_adapters, "a", ids), a)  # switching back gives the same output
    reference = tiny_llama()
    with torch.no_grad():
        assert_close(base, reference(ids))
        two_adapters.set_adapter("b")
        two_adapters.merge_adapter()
        with two_adapters.disable_adapter():  # merged adapters are taken out first
            assert_close(two_adapters(ids), reference(ids), atol=1e-4, rtol=1e-4)
        assert_close(two_adapters(ids), b)


def test_delete_adapter_removes_its_keys():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        adapter_name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True))
    assert any(".b." in k for k in pm.state_dict())
    pm.delete_adapter("b")
    assert not any(".b." in k or k.endswith(".b") for k in pm.state_dict())
    assert any(".a." in k for k in pm.state_dict()) and list(pm.peft_config) == ["a"]
    pm.delete_adapter("a")
    assert not any(".a." in k for k in pm.state_dict())


def test_the_wrapped_models_attributes_read_through():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert pm.config.hidden_size == 16 and pm.base_model.config is pm.model.config
    assert not hasattr(pm, "no_such_attribute")


def test_dora_on_a_float64_base_keeps_float64_norms():
    from peftcore import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = pm.model[0]
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float64
    expected = torch.linalg.norm(layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight
                                 @ layer.lora_A["default"].weight, dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected.detach())
