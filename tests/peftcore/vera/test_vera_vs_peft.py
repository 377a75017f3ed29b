"""VeRA against the installed HF PEFT, on tiny random transformers models (no downloads).

Each case wraps one deep copy of a model with peft.get_peft_model and another with inject_vera, whose shared
projections go on a holder shaped like PEFT's VeraModel (`.model` = the user's model, `.vera_A` / `.vera_B`), so
`holder.state_dict()` must equal `peft_model.base_model.state_dict()` key for key, in order. PEFT's adapter
vectors are then perturbed and loaded into ours (strict), and logits, gradients and merges are compared.
"""
import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore.lora_backend import activate  # noqa: E402
from peftcore.vera import VeraConfig, VeraLinear, inject_vera  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

VOCAB = 61
LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)
GPT2 = dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2)
ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]  # up (16 -> 24), down (24 -> 16): each slices the projections


class Holder(nn.Module):
    """PEFT's VeraModel, as far as the keys go: the model under `.model`, the shared projections beside it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def tiny(family: str = "llama", dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return model.to(dtype).eval()


def build(model: nn.Module, autocast: bool = True, **kwargs):
    """(PEFT's model, our holder) from copies of `model`, the same global RNG state before each (init_weights=False
    draws lambda_d from it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out flips, save_projection=False: both libraries warn
        torch.manual_seed(1)
        hf = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**kwargs), autocast_adapter_dtype=autocast)
        holder = Holder(copy.deepcopy(model))
        torch.manual_seed(1)
        inject_vera(holder.model, VeraConfig(**kwargs), "default", holder=holder, autocast_adapter_dtype=autocast)
    return hf.eval(), holder.eval()


def perturb_and_copy(hf, holder) -> None:
    """Move PEFT's trainable vectors off their init and load PEFT's whole state into ours (strict: same keys)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "vera_lambda" in name:
                p.add_(0.5 * torch.randn_like(p))
    holder.load_state_dict(hf.base_model.state_dict(), strict=True)


def ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(2))


def vera_layers(holder) -> dict[str, VeraLinear]:
    return {n: m for n, m in holder.model.named_modules() if isinstance(m, VeraLinear)}


def test_state_dict_keys_and_projections_equal_peft_without_copying():
    hf, holder = build(tiny(), r=8, target_modules=ATTN_MLP, projection_prng_key=7, init_weights=False)
    ours, theirs = holder.state_dict(), hf.base_model.state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    assert "vera_A.default" in ours and "model.model.layers.1.mlp.down_proj.vera_B.default" in ours
    for key in theirs:  # no copy: the projections come from the same key, lambda_d from the same RNG draws
        assert torch.equal(ours[key], theirs[key]), key
    assert tuple(ours["vera_A.default"].shape) == (8, 24) and tuple(ours["vera_B.default"].shape) == (24, 8)


def test_other_prng_keys_give_other_projections_equal_to_peft():
    A = {}
    for key in (0, 123):
        hf, holder = build(tiny(), r=4, target_modules=["q_proj", "up_proj"], projection_prng_key=key)
        assert torch.equal(holder.vera_A["default"], hf.base_model.vera_A["default"])
        assert torch.equal(holder.vera_B["default"], hf.base_model.vera_B["default"])
        A[key] = holder.vera_A["default"]
    assert not torch.equal(A[0], A[123])  # the key matters: the equality above is not between constants


def test_save_projection_false_keeps_projections_out_of_both_state_dicts():
    hf, holder = build(tiny(), r=4, target_modules=["q_proj"], save_projection=False)
    ours = holder.state_dict()
    assert list(ours) == list(hf.base_model.state_dict())
    assert not [k for k in ours if ".vera_A" in f".{k}" or ".vera_B" in f".{k}"]
    assert torch.equal(holder.vera_A["default"], hf.base_model.vera_A["default"])  # still there, as buffers


@pytest.mark.parametrize("kwargs", [
    dict(r=8, target_modules=ATTN_MLP, init_weights=False),
    dict(r=4, target_modules="all-linear", vera_dropout=0.1, d_initial=0.3),
    dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(r=4, target_modules=r".*layers\.0\.(self_attn\.k|mlp\.gate)_proj"),
], ids=["attn_mlp", "all_linear", "layers_to_transform", "regex"])
def test_outputs_gradients_and_counts_match_peft(kwargs):
    hf, holder = build(tiny(), **kwargs)
    assert set(vera_layers(holder)) == {n.removeprefix("base_model.model.") for n, m in hf.named_modules()
                                        if isinstance(m, peft.tuners.vera.layer.VeraLayer)}
    perturb_and_copy(hf, holder)
    x = ids()
    ours, theirs = holder.model(x).logits, hf(input_ids=x).logits
    assert_close(ours, theirs)
    ours.square().mean().backward(), theirs.square().mean().backward()
    hf_params = dict(hf.base_model.named_parameters())
    trained = [(n, p) for n, p in holder.named_parameters() if "vera_lambda" in n]
    for name, p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, hf_params[name].grad)
    count = sum(p.numel() for layer in vera_layers(holder).values() for p in layer.adapter_params("default"))
    assert count == sum(p.numel() for _, p in trained) == hf.get_nb_trainable_parameters()[0]


def test_init_weights_is_the_identity_and_the_perturbed_adapter_is_not():
    model = tiny()
    hf, holder = build(model, r=4, target_modules=ATTN_MLP)
    x = ids()
    base = model(x).logits
    assert torch.equal(holder.model(x).logits, base)  # lambda_b = 0
    perturb_and_copy(hf, holder)
    assert (holder.model(x).logits - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_matches_peft_and_unmerge_restores_the_weight(family):
    targets = ATTN_MLP if family == "llama" else ["c_attn", "c_fc", "c_proj"]
    hf, holder = build(tiny(family), r=4, target_modules=targets, fan_in_fan_out=family == "gpt2")
    perturb_and_copy(hf, holder)
    x = ids()
    unmerged = holder.model(x).logits
    layers = vera_layers(holder)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    assert_close(holder.model(x).logits, unmerged)
    hf.merge_adapter()
    hf_layers = dict(hf.base_model.model.named_modules())
    for name, layer in layers.items():
        merged = layer.base_layer.weight.detach()
        assert_close(merged, hf_layers[name].base_layer.weight.detach())
        assert_close(merged - before[name], layer.delta_weight("default").detach())
        assert (merged - before[name]).abs().max() > 0, name
        layer.unmerge()
        assert_close(layer.base_layer.weight.detach(), before[name])
    assert_close(holder.model(x).logits, unmerged)


def add_other(hf, holder, **kwargs) -> None:
    """A second adapter in both: PEFT's add_adapter and ours reuse the first adapter's projections."""
    torch.manual_seed(3)
    hf.add_adapter("other", peft.VeraConfig(**kwargs))
    torch.manual_seed(3)
    inject_vera(holder.model, VeraConfig(**kwargs), "other", holder=holder)


def test_several_active_adapters_and_a_mixed_batch_match_peft():
    hf, holder = build(tiny(), r=4, target_modules=ATTN_MLP, init_weights=False)
    add_other(hf, holder, r=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    perturb_and_copy(hf, holder)
    assert list(holder.state_dict()) == list(hf.base_model.state_dict())
    assert torch.equal(holder.vera_A["other"], holder.vera_A["default"])  # one projection for the model
    x = ids(4)
    hf.base_model.set_adapter(["default", "other"])
    for layer in vera_layers(holder).values():
        layer.active_adapters = ["default", "other"]
    assert_close(holder.model(x).logits, hf(input_ids=x).logits)
    runs = {}
    for name in ("default", "other"):
        hf.set_adapter(name)
        runs[name] = hf(input_ids=x).logits
    with hf.disable_adapter():
        runs["__base__"] = hf(input_ids=x).logits
    rows = ["other", "__base__", "default", "other"]
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: (a, {**k, "adapter_names": rows}), with_kwargs=True)
             for layer in vera_layers(holder).values()]
    mixed = holder.model(x).logits
    for hook in hooks:
        hook.remove()
    for b, name in enumerate(rows):
        assert_close(mixed[b], runs[name][b])
    assert (runs["default"] - runs["other"]).abs().max() > 1e-3  # the rows tell the adapters apart
    hf.delete_adapter("other")
    for layer in vera_layers(holder).values():
        layer.delete_adapter("other")
    assert list(holder.state_dict()) == list(hf.base_model.state_dict())  # the shared entry goes too, as in PEFT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_dtypes_match_peft(dtype, autocast):
    hf, holder = build(tiny(dtype=dtype), autocast=autocast, r=4, target_modules=ATTN_MLP)
    wanted = torch.float32 if autocast else dtype
    layer = vera_layers(holder)["model.layers.0.self_attn.q_proj"]
    assert layer.vera_lambda_d["default"].dtype == layer.vera_A["default"].dtype == wanted
    theirs = hf.base_model.state_dict()
    for key, value in holder.state_dict().items():  # bf16-rounded projections and d_initial, as PEFT's
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    perturb_and_copy(hf, holder)
    x = ids()
    ours = holder.model(x).logits
    assert ours.dtype == dtype
    assert_close(ours, hf(input_ids=x).logits)
    for layer in vera_layers(holder).values():
        layer.merge()
    hf.merge_adapter()
    hf_layers = dict(hf.base_model.model.named_modules())
    for name, layer in vera_layers(holder).items():  # the delta rounded once, in the wider dtype: PEFT's bits
        assert torch.equal(layer.base_layer.weight, hf_layers[name].base_layer.weight), name


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_bias_options_train_the_biases_peft_trains(bias):
    model = tiny("gpt2")
    hf, holder = build(model, r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias)
    theirs = sum(p.numel() for n, p in hf.named_parameters() if p.requires_grad and "vera_lambda" not in n)
    holder.model.requires_grad_(False)
    activate(holder.model, ["default"], {"default": VeraConfig(r=4, target_modules=["c_attn"], bias=bias)})
    ours = sum(p.numel() for n, p in holder.model.named_parameters() if p.requires_grad and "vera_lambda" not in n)
    assert theirs > 0 and ours == theirs


def test_a_wider_target_for_a_later_adapter_is_refused_before_anything_changes():
    _, holder = build(tiny(), r=4, target_modules=["q_proj"])  # projections (4, 16) / (16, 4)
    keys = list(holder.state_dict())
    with pytest.raises(ValueError, match="too small for a layer of in_features=16, out_features=24") as err:
        inject_vera(holder.model, VeraConfig(r=4, target_modules=["up_proj"]), "other", holder=holder)
    assert "\n" not in str(err.value)
    assert list(holder.state_dict()) == keys
