"""LoRA on nn.MultiheadAttention against the installed HF PEFT (0.21.2's lora.MultiheadAttention).

PEFT builds the adapter, its LoRA tensors are moved off their init (B would be zero: no effect) and copied into
ours by load_state_dict, so every comparison runs the same numbers through both libraries' code. The attention's
outputs and gradients are compared bit for bit (torch.equal): both add the same deltas in the same order and run
torch's own attention forward. Whole models are compared fp32-close: a CPU GEMM of equal operands held at other
addresses may round differently (seen on the plain head Linear).
"""
import copy
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftcore
from peftcore import PeftModel, get_peft_model
from peftcore.adapter_keys import adapter_state_dict
from peftcore.lora.layer import Adapter
from peftcore.lora.mha import LoraMultiheadAttention, LoraOutProj
from peftcore.lora.registry import LORA_LAYERS
from tests.tolerances import assert_close

KEYS = {  # PEFT's in-memory keys of one attention adapter (on disk without ".default")
    "base_model.model.attn.lora_A.default.weight": (2, 8),
    "base_model.model.attn.lora_B.default.weight": (24, 2),
    "base_model.model.attn.base_layer.out_proj.lora_A.default.weight": (2, 8),
    "base_model.model.attn.base_layer.out_proj.lora_B.default.weight": (8, 2),
}


class Attn(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def inputs(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1).contiguous()


def config(lib, targets=("attn",), **kw):
    return lib.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), **kw)


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def build(batch_first=True, targets=("attn",), **kw):
    """-> (base, PEFT's model, ours with PEFT's adapter tensors)."""
    torch.manual_seed(0)
    base = Attn(batch_first)
    reference = peft.get_peft_model(copy.deepcopy(base), config(peft, targets, **kw))
    ours = get_peft_model(copy.deepcopy(base), config(peftcore, targets, **kw))
    perturb(reference)
    ours.load_state_dict(reference.state_dict())  # strict: the in-memory keys are PEFT's
    return base, reference, ours


def attention(model, name: str = "attn") -> LoraMultiheadAttention:
    return model.base_model.model.get_submodule(name)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_keys_counts_outputs_and_gradients_equal_peft(batch_first):
    """The attention alone bit for bit (same deltas added in the same order, torch's own forward), compared on
    PEFT's first forward (its merge / unmerge round trip may move the base weights by an ulp); the model with its
    plain head close (CPU GEMMs of equal operands at other addresses may round differently)."""
    base, reference, ours = build(batch_first)
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if ".lora_" in k} == KEYS
    assert isinstance(attention(ours), LoraMultiheadAttention) and isinstance(attention(ours), LORA_LAYERS)
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    x = inputs(batch_first)
    expected, got = attention(reference)(x, x, x)[0], attention(ours)(x, x, x)[0]
    assert torch.equal(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(grads) == set(KEYS)
    assert all(torch.equal(p.grad, grads[n]) for n, p in ours.named_parameters() if p.requires_grad)
    assert (reference(x) - base(x)).abs().max() > 1e-2, "the adapter must change the output"
    assert_close(ours(x), reference(x))


def test_half_precision_rounds_as_peft_and_leaves_the_base_weights_alone():
    """fp32 adapters on a bf16 attention: PEFT's roundings (its second out_proj add in fp32). PEFT's forward merges
    and unmerges, which moves bf16 base weights; ours replaces them for the call only."""
    torch.manual_seed(0)
    base = Attn().to(torch.bfloat16)
    reference = peft.get_peft_model(copy.deepcopy(base), config(peft))
    ours = get_peft_model(copy.deepcopy(base), config(peftcore))
    perturb(reference)
    ours.load_state_dict(reference.state_dict())
    layer = attention(ours)
    assert layer.lora_A["default"].weight.dtype == layer.base_layer.out_proj.lora_B["default"].weight.dtype == \
        torch.float32
    x = inputs().bfloat16()
    got = layer(x, x, x)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, attention(reference)(x, x, x)[0])
    got.float().square().sum().backward()
    assert torch.equal(layer.base_layer.in_proj_weight, base.attn.in_proj_weight)
    assert torch.equal(layer.out_proj.weight, base.attn.out_proj.weight) and layer.out_proj.weight.grad is None


def test_out_proj_adapter_matters_and_a_linear_head_beside_it_matches():
    base, reference, ours = build(targets=("attn", "head"))
    x = inputs()
    assert_close(ours(x), reference(x))
    with torch.no_grad():
        before = ours(x)
        attention(ours).base_layer.out_proj.lora_B["default"].weight.zero_()
        assert (ours(x) - before).abs().max() > 1e-2, "out_proj's adapter must take part in the output"


def test_a_new_adapter_equals_peft_from_the_same_seed():
    """PEFT makes out_proj's factors, then in_proj's, then out_proj's again (a later adapter: in_proj's, then
    out_proj's): the same draws in the same order."""
    torch.manual_seed(0)
    base = Attn()
    torch.manual_seed(5)
    reference = peft.get_peft_model(copy.deepcopy(base), config(peft, init_lora_weights="gaussian"))
    torch.manual_seed(5)
    ours = get_peft_model(copy.deepcopy(base), config(peftcore, init_lora_weights="gaussian"))
    torch.manual_seed(6)
    reference.add_adapter("other", config(peft, init_lora_weights=False))
    torch.manual_seed(6)
    ours.add_adapter("other", config(peftcore, init_lora_weights=False))
    expected = reference.state_dict()
    assert set(ours.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())


def file_tensors(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_adapter_files_move_both_ways(tmp_path):
    base, reference, ours = build()
    x = inputs()
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    assert set(file_tensors(tmp_path / "ours")) == set(file_tensors(tmp_path / "peft")) == {
        k.replace(".default", "") for k in KEYS}
    assert set(adapter_state_dict(ours, "default", ours.peft_config["default"])) == set(
        peft.get_peft_model_state_dict(reference))
    theirs_from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ours_from_theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert not theirs_from_ours.training and not ours_from_theirs.training  # loaded for inference: eval mode
    reference.eval()  # so the same attention path runs (eval without grad takes torch's fused one)
    with torch.no_grad():
        assert_close(theirs_from_ours(x), reference(x))
        assert_close(ours_from_theirs(x), reference(x))


def test_merge_equals_unmerged_and_unmerge_restores_the_weights():
    base, reference, ours = build()
    x, layer = inputs(), attention(ours)
    W_in, W_out = layer.base_layer.in_proj_weight.detach().clone(), layer.out_proj.weight.detach().clone()
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge_adapter()
        reference.merge_adapter()
        assert layer.merged_adapters == ["default"] and layer.base_layer.out_proj.merged_adapters == ["default"]
        peft_attn = attention(reference).base_layer
        assert torch.equal(layer.base_layer.in_proj_weight, peft_attn.in_proj_weight)
        assert torch.equal(layer.out_proj.weight, peft_attn.out_proj.base_layer.weight)
        assert_close(ours(x), unmerged)
        ours.unmerge_adapter()
    assert_close(layer.base_layer.in_proj_weight.detach(), W_in)
    assert_close(layer.out_proj.weight.detach(), W_out)
    assert isinstance(layer.base_layer.in_proj_weight, nn.Parameter)
    with torch.no_grad():
        assert_close(ours(x), unmerged)


def test_merge_and_unload_gives_a_plain_attention():
    base, reference, ours = build()
    x = inputs()
    with torch.no_grad():
        expected = reference(x)
        plain = ours.merge_and_unload()
        assert type(plain.attn) is nn.MultiheadAttention
        assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert not any(isinstance(m, LORA_LAYERS) for m in plain.modules())
        assert set(plain.state_dict()) == set(base.state_dict())
        assert_close(plain(x), expected)
        assert_close(plain(x), reference.merge_and_unload()(x))


def test_disabled_is_the_base_model():
    base, reference, ours = build()
    x = inputs()
    with torch.no_grad():
        with ours.disable_adapter():
            assert_close(ours(x), base(x))
        ours.merge_adapter()
        with ours.disable_adapter():  # unmerged first, as PEFT's layer does at the next forward
            assert_close(ours(x), base(x))
        assert (ours(x) - base(x)).abs().max() > 1e-2


def test_several_active_adapters_add_up_as_in_peft():
    base, reference, ours = build()
    reference.add_adapter("other", config(peft))
    ours.add_adapter("other", config(peftcore))
    perturb(reference, seed=1)
    ours.load_state_dict(reference.state_dict())
    x = inputs()
    reference.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    attention(ours)(x, x, x)[0].square().sum().backward()  # PEFT's gradient reaches the last adapter only
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in ours.parameters() if p.requires_grad)
    with torch.no_grad():
        both = ours(x)
        assert_close(both, reference(x))
        ours.set_adapter("default")
        assert (ours(x) - both).abs().max() > 1e-2
        ours.set_adapter(["default", "other"])
        ours.merge_adapter()
        assert_close(ours(x), both)
        ours.unmerge_adapter()
    ours.delete_adapter("other")
    layer = attention(ours)
    assert list(layer.lora_A) == list(layer.base_layer.out_proj.lora_A) == ["default"]
    reference.base_model.set_adapter("default")
    with torch.no_grad():
        assert_close(ours(x), reference(x))


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_a_weighted_adapter_equals_peft(combination):
    _, reference, ours = build()
    reference.add_adapter("other", config(peft))
    ours.add_adapter("other", config(peftcore))
    perturb(reference, seed=1)
    ours.load_state_dict(reference.state_dict())
    for model in (reference, ours):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.7], "mix", combination_type=combination)
        model.set_adapter("mix")
    x = inputs()
    with torch.no_grad():
        assert_close(ours(x), reference(x))


def test_the_layer_answers_the_adapter_protocol():
    _, _, ours = build()
    layer = attention(ours)
    assert isinstance(layer, Adapter) and isinstance(layer.base_layer.out_proj, LoraOutProj)
    assert [tuple(p.shape) for p in layer.adapter_params("default")] == [(2, 8), (24, 2)]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.equal(layer.delta_weight("default"), (B @ A) * layer.scaling["default"])
    # PEFT's properties read through (nn.TransformerEncoderLayer reads several)
    assert layer.embed_dim == 8 and layer.num_heads == 2 and layer.batch_first
    assert not layer._qkv_same_embed_dim  # while adapters run: keeps nn.TransformerEncoderLayer off its fused path
    with ours.disable_adapter():
        assert layer._qkv_same_embed_dim
    assert type(layer.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_inside_a_transformer_encoder_layer_as_in_peft():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    reference = peft.get_peft_model(copy.deepcopy(base), config(peft, ["self_attn"]))
    ours = get_peft_model(copy.deepcopy(base), config(peftcore, ["self_attn"]))
    perturb(reference)
    ours.load_state_dict(reference.state_dict())
    x = inputs()
    trained = ours(x)
    assert_close(trained, reference(x))
    ours.eval()  # the encoder layer's fused eval path would run the attention without LoRA (it does under PEFT)
    with torch.no_grad():
        assert_close(ours(x), trained)
        assert (ours(x) - base.eval()(x)).abs().max() > 1e-2
        ours.merge_adapter()  # merged: the fused path may run, on the merged weights
        assert not attention(ours, "block.self_attn").adds_adapters()
        assert_close(ours(x), trained)


def test_out_proj_named_alone_has_no_effect_as_in_peft(tmp_path):
    with pytest.warns(UserWarning, match="has no effect"):
        base, reference, ours = build(targets=("out_proj",))
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert isinstance(ours.base_model.model.attn.out_proj, LoraOutProj)
    x = inputs()
    with torch.no_grad():
        assert_close(ours(x), base(x))
        assert_close(reference(x), base(x))
    ours.save_pretrained(tmp_path)
    peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # PEFT reads the file


def test_attention_and_its_out_proj_named_together():
    """PEFT adds a second out_proj adapter there that nothing runs (keys `attn.out_proj.lora_*`); here the attention's
    LoRA covers out_proj and the name is skipped with a warning. Outputs equal."""
    with pytest.warns(UserWarning, match="adapts it already"):
        ours = get_peft_model(Attn(), config(peftcore, ["attn", "out_proj"]))
    assert {k for k in ours.state_dict() if ".lora_" in k} == set(KEYS)


def test_out_proj_once_gives_w_plus_delta(monkeypatch):
    """out_proj_twice=False: W_out + s*B*A (the fix proposed upstream), in the forward and in merges alike."""
    monkeypatch.setattr(LoraMultiheadAttention, "out_proj_twice", False)
    base, _, ours = build()
    layer, x = attention(ours), inputs()
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.attn.in_proj_weight += layer.delta_weight("default")
        plain.attn.out_proj.weight += layer.base_layer.out_proj.delta_weight("default")
        assert_close(ours(x), plain(x))
        ours.merge_adapter()
        assert_close(ours(x), plain(x))
        assert_close(layer.out_proj.weight, plain.attn.out_proj.weight)


def test_lora_dropout_warns_and_has_no_effect_as_in_peft():
    with pytest.warns(UserWarning, match="no effect"):
        base, reference, ours = build(lora_dropout=0.5)
    ours.train(), reference.train()
    x = inputs()
    assert_close(ours(x), reference(x))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("options, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
])
def test_refused_options_are_one_line_errors(options, match):
    model = Attn()
    with pytest.raises(ValueError) as excinfo:
        get_peft_model(model, config(peftcore, **options))
    assert match in one_line(excinfo)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear, "nothing was wrapped"
    if options.get("use_dora"):  # PEFT refuses DoRA too
        with pytest.raises(ValueError, match="DoRA"):
            peft.get_peft_model(Attn(), config(peft, **options))


def test_separate_key_value_dims_are_refused_as_in_peft():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    with pytest.raises(ValueError) as excinfo:
        get_peft_model(model, config(peftcore))
    assert "kdim" in one_line(excinfo)
    with pytest.raises(ValueError, match="same"):
        peft.get_peft_model(copy.deepcopy(model), config(peft))


def test_a_mixed_adapter_batch_is_refused_as_in_peft():
    _, reference, ours = build()
    ours.eval(), reference.eval()
    x = inputs()
    with pytest.raises(TypeError) as excinfo:
        ours(x, adapter_names=["default", "__base__", "default"])
    assert "mixed" in one_line(excinfo)
    with pytest.raises(TypeError, match="mixed"):
        reference(x, adapter_names=["default", "__base__", "default"])


def test_fan_in_fan_out_is_set_off_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = get_peft_model(Attn(), config(peftcore, fan_in_fan_out=True))
    assert ours.peft_config["default"].fan_in_fan_out is False
    assert any("fan_in_fan_out is True" in str(w.message) for w in caught)


def test_dora_is_refused_also_where_low_cpu_mem_usage_injects_without_it():
    with pytest.raises(ValueError, match="use_dora=True does not work with nn.MultiheadAttention"):
        get_peft_model(Attn(), config(peftcore, use_dora=True), low_cpu_mem_usage=True)
