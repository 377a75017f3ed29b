"""LoftQ (peftcore.lora.loftq) against the installed HF PEFT 0.21.2, on tiny random weights.

PEFT's loftq_init sends its work to "cuda" (or "xpu") whatever the weight's device; OnCPU below redirects those
moves to the CPU, where bitsandbytes' NF4 runs too, so PEFT's own code is the oracle here without a GPU.
NF4: PEFT's dequant(Q), A and B are reproduced bit for bit (the same NF4 rounding, the same SVD on the same
input); int8: PEFT rounds W to fp16 before its int8 rounding and peftcore does not (loftq.py's docstring), so
there the comparison is one int8 step per weight and the error LoftQ reaches.
"""
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import peft.utils.loftq_utils as peft_loftq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from peftcore import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftcore.config import LoftQConfig  # noqa: E402
from peftcore.kernels import quant  # noqa: E402
from peftcore.lora import loftq  # noqa: E402
from peftcore.lora.layer import LoraLinear  # noqa: E402
from peftcore.models import load_pretrained, save_pretrained  # noqa: E402
from peftcore.models.layers import Conv1D  # noqa: E402
from peftcore.models.quantized import QuantLinear  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

VOCAB = 101
# Widths that are multiples of 64: bitsandbytes 0.50.2's CPU dequantize_4bit mis-decodes (m > 1, n) weights whose
# n is a multiple of 16 but not of 64 (blocks that straddle rows; checked n = 2..258: 16, 32, 48, 80, 96, ... wrong,
# its quantize_4bit codes equal ours), which would make PEFT's CPU LoftQ the wrong oracle there.
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
TARGETS = ["q_proj", "v_proj", "down_proj"]
LOFTQ = dict(loftq_bits=4, loftq_iter=1)


def on_cpu(device):
    if isinstance(device, str) and device.startswith(("cuda", "xpu")):
        return "cpu"
    if isinstance(device, torch.device) and device.type in ("cuda", "xpu"):
        return torch.device("cpu")
    return device


class OnCPU(TorchFunctionMode):
    """Tensor.to("cuda") -> Tensor.to("cpu") inside PEFT's loftq_init / bitsandbytes (a CPU-only torch refuses)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            args = tuple(on_cpu(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = on_cpu(kwargs["device"])
        return func(*args, **kwargs)


def peft_factors(W, bits, r, num_iter):
    with OnCPU():
        return peft_loftq.loftq_init(W.clone(), num_bits=bits, reduced_rank=r, num_iter=num_iter)


def lora_layer(base: nn.Module, r=4, alpha=4, init_lora_weights=True, **kwargs) -> LoraLinear:
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init_lora_weights, **kwargs),
                      r, alpha)
    return layer


# -- 1. the algorithm against PEFT's loftq_init ----------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 64), (33, 70)])  # 33 x 70: a short last NF4 block
@pytest.mark.parametrize("num_iter", [1, 3])
def test_nf4_factors_and_base_equal_peft_bit_for_bit(shape, num_iter):
    W = 0.02 * torch.randn(*shape)
    Q_ref, A_ref, B_ref = peft_factors(W, 4, 4, num_iter)
    Q, A, B = loftq.loftq_factors(W, 4, "nf4", num_iter)
    assert torch.equal(Q, Q_ref)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)
    assert A.abs().max() > 0 and B.abs().max() > 0  # not a zero adapter


@pytest.mark.parametrize("num_iter", [1, 3])
def test_int8_is_peftcore_int8_within_one_step_of_peft(num_iter):
    W = 0.02 * torch.randn(40, 72)
    Q_ref, A_ref, B_ref = peft_factors(W, 8, 4, num_iter)
    Q, A, B = loftq.loftq_factors(W, 4, "int8", num_iter)
    step = W.abs().amax(dim=1, keepdim=True) / 127
    assert ((Q - Q_ref).abs() / step).max() <= 1.2  # fp16 rounding moves a weight by at most one code (+ scale)
    ours, theirs = loftq.relative_error(W, Q, A, B), loftq.relative_error(W, Q_ref, A_ref, B_ref)
    assert ours == pytest.approx(theirs, rel=0.05)
    assert ours < loftq.relative_error(W, loftq.dequantized(W, "int8"))


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_the_error_is_below_plain_quantization_and_falls_with_iterations(method):
    W = 0.02 * torch.randn(64, 96)
    plain = loftq.relative_error(W, loftq.dequantized(W, method, 32))
    errors = [loftq.relative_error(W, *loftq.loftq_factors(W, 8, method, t, 32)) for t in range(1, 6)]
    assert errors[0] < 0.95 * plain
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_the_split_puts_sqrt_s_on_both_factors():
    residual = torch.randn(12, 20)
    A, B = loftq.low_rank(residual, 3)
    S = torch.linalg.svdvals(residual)[:3]
    assert_close(torch.linalg.norm(A, dim=1), S.sqrt())  # rows of A: sqrt(s_i) * a unit vector
    assert_close(torch.linalg.norm(B, dim=0), S.sqrt())
    assert_close(torch.linalg.svdvals(B @ A)[:3], S)


# -- 2. init_lora_weights="loftq" on a layer ---------------------------------------------------------------
def loftq_layer(base, **kwargs):
    """A LoRA layer initialised by LoftQ directly (the call init_adapter makes), whatever layer.py passes."""
    layer = lora_layer(base, **kwargs)
    with pytest.warns() if kwargs.get("alpha", 4) != kwargs.get("r", 4) else warnings.catch_warnings():
        loftq.init_loftq(layer, "default", LOFTQ)
    return layer


def test_a_linear_gets_peft_factors_and_its_base_becomes_dequant_q():
    base = nn.Linear(64, 48)
    W = base.weight.detach().clone()
    layer = loftq_layer(base)
    Q_ref, A_ref, B_ref = peft_factors(W, 4, 4, 1)
    assert torch.equal(layer.base_layer.weight, Q_ref)
    assert torch.equal(layer.lora_A["default"].weight, A_ref) and torch.equal(layer.lora_B["default"].weight, B_ref)
    x = torch.randn(5, 64)
    dense, plain = nn.functional.linear(x, W, base.bias), nn.functional.linear(x, Q_ref, base.bias)
    with torch.no_grad():
        assert (layer(x) - dense).norm() < 0.95 * (plain - dense).norm()


def test_quantizing_afterwards_reproduces_q_exactly():
    """The round trip: the LoftQ base, quantized by peftcore's NF4, holds the very codes and absmaxes of Q."""
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 72))
    W = model[0].weight.detach().clone()
    model[0] = loftq_layer(model[0])
    dense_base = model[0].base_layer.weight.detach().clone()
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model[0](x)
    assert loftq.quantize_base_layers(model, "nf4") == ["0.base_layer", "2"]
    quantized = model[0].base_layer
    assert isinstance(quantized, QuantLinear) and isinstance(model[2], QuantLinear)
    assert type(model[0].lora_A["default"]) is nn.Linear  # the adapter itself stays dense
    assert torch.equal(quantized.dequantize(), dense_base)
    reference = quant.nf4_quantize(W)  # LoftQ's Q at one step is NF4(W)
    assert torch.equal(quantized.packed, reference.packed) and torch.equal(quantized.absmax, reference.absmax)
    with torch.no_grad():
        assert_close(model[0](x), before)


def test_quantize_base_layers_skips_heads_and_modules_to_save_copies():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 5)

    model = Tiny()
    model.proj = lora_layer(model.proj, r=2, alpha=2)
    assert loftq.quantize_base_layers(model) == ["proj.base_layer"]
    assert type(model.lm_head) is nn.Linear


def test_a_gpt2_conv1d_is_factored_as_its_out_in_weight():
    """PEFT 0.21.2 factors Conv1D's stored (in, out) matrix (A comes out (r, out): its forward fails); ours is
    the nn.Linear holding the same weight, transposed, and quantizes like QuantLinear.from_linear."""
    conv = Conv1D(48, 64)  # (in 64, out 48)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = loftq_layer(conv), loftq_layer(linear)
    assert a.fan_in_fan_out
    assert torch.equal(a.base_layer.weight, b.base_layer.weight.T)
    assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_close(a(x), b(x))
    loftq.quantize_base_layers(a)
    assert torch.equal(a.base_layer.dequantize(), b.base_layer.weight)


def test_a_lora_bias_starts_at_zero():
    layer = loftq_layer(nn.Linear(16, 16), lora_bias=True)
    assert torch.equal(layer.lora_B["default"].bias, torch.zeros(16))


def test_a_scaling_other_than_one_warns_as_peft_does_not_divide_by_it():
    layer = lora_layer(nn.Linear(16, 16), r=4, alpha=8)
    with pytest.warns(UserWarning, match=r"scaling 2 .*set lora_alpha = r"):
        loftq.init_loftq(layer, "default", LOFTQ)


# -- 3. errors -----------------------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_loftq_over_a_quantized_base_says_what_to_do_instead():
    layer = lora_layer(QuantLinear.from_linear(nn.Linear(64, 32), "nf4"))
    with pytest.raises(TypeError) as err:
        loftq.init_loftq(layer, "default", LOFTQ)
    message = one_line(err)
    assert "already quantized (nf4)" in message and "quantize afterwards" in message
    assert "replace_lora_weights_loftq" in message


def test_through_get_peft_model_a_quantized_base_is_refused(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint, quantize="nf4")
    with pytest.raises(TypeError, match=r"needs the dense weight, and this base is already quantized"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="loftq",
                                         loftq_config=LOFTQ))


def test_r_above_the_weight_rank_is_refused():
    layer = lora_layer(nn.Linear(8, 6), r=7, alpha=7)
    with pytest.raises(ValueError, match=r"top r of a 6x8 weight: r=7 must be <= 6"):
        loftq.init_loftq(layer, "default", LOFTQ)


@pytest.mark.parametrize("loftq_config, message", [
    ({}, r"needs loftq_config, e.g. LoftQConfig"),
    ({"loftq_bits": 4}, r"missing: \['loftq_iter'\]"),
    ({"loftq_bits": 4, "loftq_iter": 1, "loftq_group": 64}, r"unknown: \['loftq_group'\]"),
    ({"loftq_bits": 2, "loftq_iter": 1}, r"loftq_bits=2: LoftQ quantizes to 4 bits \(NF4"),
    ({"loftq_bits": 3, "loftq_iter": 1}, r"loftq_bits=3"),
    ({"loftq_bits": True, "loftq_iter": 1}, r"loftq_bits=True"),
    ({"loftq_bits": "4", "loftq_iter": 1}, r"loftq_bits='4'"),
    ({"loftq_bits": 4, "loftq_iter": 0}, r"loftq_iter=0: LoftQ takes a whole number >= 1"),
])
def test_bad_loftq_configs_fail_in_one_line(loftq_config, message):
    with pytest.raises(ValueError, match=message) as err:
        LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=loftq_config)
    one_line(err)


@pytest.mark.parametrize("loftq_config", [{"loftq_bits": 2, "loftq_iter": 1}, {"loftq_bits": 4, "loftq_iter": 0}])
def test_peft_refuses_the_same_configs_when_it_builds_a_layer(loftq_config):
    config = peft.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="loftq", loftq_config=loftq_config)
    with OnCPU(), pytest.raises(ValueError, match="Only nf4 and int8|greater than 0"):
        peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), config)


def test_loftq_config_beside_another_scheme_warns_and_is_dropped_as_in_peft():
    with pytest.warns(UserWarning, match="loftq_config") as theirs:
        reference = peft.LoraConfig(target_modules=["q_proj"], loftq_config=LoftQConfig())
    with pytest.warns(UserWarning, match=r"loftq_config=\{'loftq_bits': 4, 'loftq_iter': 1\} ignored") as ours:
        config = LoraConfig(target_modules=["q_proj"], loftq_config=LoftQConfig())
    assert len(theirs) == len(ours) == 1
    assert config.loftq_config == reference.loftq_config == {}


def test_config_round_trip_matches_peft_adapter_config():
    kwargs = dict(target_modules=["q_proj"], r=4, lora_alpha=4, init_lora_weights="loftq")
    ours = LoraConfig(**kwargs, loftq_config=LoftQConfig(loftq_iter=3))
    theirs = peft.LoraConfig(**kwargs, loftq_config=peft.LoftQConfig(loftq_iter=3))
    saved = ours.to_dict()
    assert saved["loftq_config"] == theirs.to_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    assert saved["init_lora_weights"] == "loftq"
    again = LoraConfig.from_dict(json.loads(json.dumps(saved)))
    assert again.loftq_config == ours.loftq_config and again.init_lora_weights == "loftq"
    peft_saved = json.loads(json.dumps(theirs.to_dict(), default=sorted))
    assert LoraConfig.from_dict(peft_saved).loftq_config == {"loftq_bits": 4, "loftq_iter": 3}


def test_dora_with_loftq_is_allowed_as_in_peft():
    config = peft.LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights="loftq", loftq_config=LOFTQ)
    assert config.use_dora
    assert LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights="loftq", loftq_config=LOFTQ).use_dora


# -- 4. through get_peft_model, against PEFT on a tiny transformers Llama ----------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return folder


def ids():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def peft_loftq_model(folder, **kwargs):
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=4, init_lora_weights="loftq",
                             loftq_config=peft.LoftQConfig(**{**LOFTQ, **kwargs.pop("loftq", {})}), **kwargs)
    with OnCPU():
        return peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder), config).eval()


def our_loftq_model(folder, **kwargs):
    config = LoraConfig(**{"target_modules": TARGETS, "r": 4, "lora_alpha": 4, "init_lora_weights": "loftq",
                           "loftq_config": {**LOFTQ, **kwargs.pop("loftq", {})}, **kwargs})
    return get_peft_model(load_pretrained(folder), config).eval()


@pytest.mark.parametrize("kwargs", [{}, {"loftq": {"loftq_iter": 3}}, {"use_dora": True}],
                         ids=["iter1", "iter3", "dora"])
def test_get_peft_model_equals_peft(tiny_checkpoint, kwargs):
    theirs = peft_loftq_model(tiny_checkpoint, **dict(kwargs))
    ours = our_loftq_model(tiny_checkpoint, **dict(kwargs))
    reference, state = theirs.state_dict(), ours.state_dict()
    checked = [k for k in state if "lora_" in k or ".base_layer." in k]
    assert len(checked) >= 3 * 2 * len(TARGETS)
    assert set(checked) == {k for k in reference if "lora_" in k or ".base_layer." in k}
    for key in checked:
        assert_close(state[key], reference[key])
    with torch.no_grad():
        expected = theirs(input_ids=ids()).logits
        assert_close(ours(ids()), expected)
        with ours.disable_adapter():
            assert (ours(ids()) - expected).abs().max() > 1e-4  # the adapter is not a no-op


@pytest.fixture(scope="module")
def loftq_pair(tiny_checkpoint, tmp_path_factory):
    """PEFT's and our LoftQ models on one checkpoint, each adapter saved, and the LoftQ base (dequant(Q)) saved."""
    theirs, ours = peft_loftq_model(tiny_checkpoint), our_loftq_model(tiny_checkpoint)
    folders = {name: tmp_path_factory.mktemp(name) for name in ("theirs", "ours", "base")}
    theirs.save_pretrained(folders["theirs"])
    ours.save_pretrained(folders["ours"])
    with torch.no_grad():
        expected = ours(ids())
    save_pretrained(our_loftq_model(tiny_checkpoint).unload(), folders["base"])
    return theirs, ours, folders, expected


def test_adapter_files_move_both_ways_over_the_loftq_base(loftq_pair):
    theirs, ours, folders, expected = loftq_pair
    saved = json.loads((folders["ours"] / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == LOFTQ
    with torch.no_grad():
        peft_logits = theirs(input_ids=ids()).logits
        here = PeftModel.from_pretrained(load_pretrained(folders["base"]), folders["theirs"])
        assert_close(here(ids()), peft_logits)
        with OnCPU():  # PEFT reruns LoftQ on load: over the LoftQ base that changes nothing (NF4 of dequant(Q) is Q)
            there = peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(folders["base"]), folders["ours"])
        assert_close(there(input_ids=ids()).logits, expected)


def test_loading_does_not_rerun_loftq_and_an_nf4_base_takes_the_adapter(tiny_checkpoint, loftq_pair):
    """The saved adapter goes on the base it is given as it is: the original dense weights stay; and LoftQ on the
    dense model, then quantize_base_layers (the order a LoftQ job takes), computes what the saved adapter does
    over load_pretrained(quantize="nf4"), whose NF4 of W is one-step LoftQ's Q exactly."""
    _, _, folders, _ = loftq_pair
    original = load_pretrained(tiny_checkpoint)
    W = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dense = PeftModel.from_pretrained(original, folders["ours"])
    assert torch.equal(dense.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, W)
    built = our_loftq_model(tiny_checkpoint)
    assert len(loftq.quantize_base_layers(built.get_base_model())) == 7 * LLAMA["num_hidden_layers"]
    quantized = PeftModel.from_pretrained(load_pretrained(tiny_checkpoint, quantize="nf4"), folders["ours"])
    with torch.no_grad():
        assert_close(quantized(ids()), built(ids()))
        with quantized.disable_adapter():
            assert (quantized(ids()) - built(ids())).abs().max() > 1e-4


# -- 5. replace_lora_weights_loftq: over an already-quantized base ------------------------------------------------
def qlora(folder, method="nf4", targets=TARGETS):
    base = load_pretrained(folder, quantize=method, group_size=32 if method == "int4" else None)
    return get_peft_model(base, LoraConfig(target_modules=targets, r=4, lora_alpha=4)).eval()


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_replace_lowers_every_layer_error_and_equals_one_loftq_step(tiny_checkpoint, method):
    model, dense = qlora(tiny_checkpoint, method), load_pretrained(tiny_checkpoint)
    before = layer_errors(model, dense)
    replaced = loftq.replace_lora_weights_loftq(model, tiny_checkpoint)
    assert sorted(replaced) == sorted(before) and len(replaced) == len(TARGETS) * LLAMA["num_hidden_layers"]
    after = layer_errors(model, dense)
    assert all(after[k] < 0.97 * before[k] for k in after), (before, after)  # measured 0.75 - 0.95 here
    name = "model.layers.1.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(name)
    W = dense.get_submodule(name).weight.detach()
    Q = layer.base_layer.dequantize(torch.float32)
    A, B = loftq.low_rank(W - Q, 4)
    assert torch.equal(layer.lora_A["default"].weight, A) and torch.equal(layer.lora_B["default"].weight, B)
    if method == "nf4":  # over load_pretrained's NF4 (no double quant) this is loftq_init's one step: PEFT's factors
        _, A_ref, B_ref = peft_factors(W, 4, 4, 1)
        assert torch.equal(A, A_ref) and torch.equal(B, B_ref)


def layer_errors(model, dense) -> dict[str, float]:
    """Per LoRA layer over a quantized base: ||layer(x) - the dense model's layer(x)|| on random inputs."""
    g = torch.Generator().manual_seed(3)
    errors = {}
    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if isinstance(getattr(layer, "base_layer", None), QuantLinear):
                x = torch.randn(5, layer.in_features, generator=g)
                errors[name] = (layer(x) - dense.get_submodule(name)(x)).norm().item()
    return errors


def test_replace_lowers_the_logit_error_of_the_whole_model(tiny_checkpoint):
    model, dense = qlora(tiny_checkpoint, targets="all-linear"), load_pretrained(tiny_checkpoint)
    with torch.no_grad():
        target = dense(ids())
        before = (model(ids()) - target).norm()
        assert len(loftq.replace_lora_weights_loftq(model, tiny_checkpoint / "model.safetensors")) == 14
        assert (model(ids()) - target).norm() < 0.95 * before


def test_a_callback_that_says_no_reverts_that_layer(tiny_checkpoint):
    model = qlora(tiny_checkpoint)
    seen = []

    def keep_all_but_v(peft_model, name):
        assert peft_model is model
        seen.append(name)
        return not name.endswith("v_proj")

    kept = loftq.replace_lora_weights_loftq(model, tiny_checkpoint, callback=keep_all_but_v)
    assert len(seen) == 6 and len(kept) == 4
    for name in seen:
        B = model.get_base_model().get_submodule(name).lora_B["default"].weight
        assert (B.abs().max() > 0) == (name in kept)  # reverted: QLoRA's zero B again


def test_a_state_dict_works_and_one_missing_keys_is_named(tiny_checkpoint):
    model = qlora(tiny_checkpoint)
    state = {k: v for k, v in load_pretrained(tiny_checkpoint).state_dict().items()}
    assert len(loftq.replace_lora_weights_loftq(model, state)) == 6
    state.pop("model.layers.0.self_attn.v_proj.weight")
    with pytest.raises(ValueError) as err:
        loftq.replace_lora_weights_loftq(qlora(tiny_checkpoint), state)
    message = one_line(err)
    assert "no dense weight for 1 of the 6" in message and "model.layers.0.self_attn.v_proj.weight" in message


def test_only_safetensors_are_read(tiny_checkpoint, tmp_path):
    model = qlora(tiny_checkpoint)
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"safetensors only .*pytorch_model.bin is not a \.safetensors file") as err:
        loftq.replace_lora_weights_loftq(model, pickle)
    one_line(err)
    with pytest.raises(FileNotFoundError, match="peftcore reads safetensors only"):
        loftq.replace_lora_weights_loftq(model, tmp_path)  # a folder with only the .bin


def test_a_shape_mismatch_names_key_and_shapes(tiny_checkpoint, tmp_path):
    model = qlora(tiny_checkpoint)
    state = load_pretrained(tiny_checkpoint).state_dict()
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(64, 32\) but the quantized layer holds "
                                         r"\(64, 64\)"):
        loftq.replace_lora_weights_loftq(model, tmp_path)


def test_replace_needs_a_quantized_lora_layer_and_the_adapter(tiny_checkpoint):
    dense = get_peft_model(load_pretrained(tiny_checkpoint), LoraConfig(target_modules=["q_proj"], r=4))
    with pytest.raises(ValueError, match="no LoRA layer over a quantized base"):
        loftq.replace_lora_weights_loftq(dense, tiny_checkpoint)
    with pytest.raises(ValueError, match=r"no quantized LoRA layer holds adapter 'other' \(they hold: default\)"):
        loftq.replace_lora_weights_loftq(qlora(tiny_checkpoint), tiny_checkpoint, adapter_name="other")


def test_an_embedding_target_is_refused(tiny_checkpoint):
    """PEFT 0.21.2 fails there with a TypeError (loftq_init() missing 'config'); we say what to do."""
    with pytest.raises(ValueError, match="not defined for embedding layers") as err:
        our_loftq_model(tiny_checkpoint, target_modules=["embed_tokens", "q_proj"])
    one_line(err)


# -- 6. a recipe's LoftQ: load dense, build the adapter, quantize after (jobs/bases.py) ----------------------------
def recipe(*overrides):
    from peftcore.jobs.builtin import EXAMPLES_DIR
    from peftcore.jobs.recipe import load_recipe

    return load_recipe(EXAMPLES_DIR / "support_lora.toml", list(overrides))


LOFTQ_RECIPE = ('adapter.init_lora_weights="loftq"', "adapter.loftq_config={loftq_bits = 4, loftq_iter = 1}",
                'model.quantize="nf4"')


def test_a_loftq_recipe_asks_for_the_dense_base_first():
    from peftcore.jobs.bases import loftq_first

    assert not loftq_first(recipe('model.quantize="nf4"'))
    assert loftq_first(recipe(*LOFTQ_RECIPE))


def test_a_loftq_recipe_quantizes_after_the_adapter_is_built(tiny_checkpoint):
    from peftcore.jobs.bases import quantize_after_loftq

    loftq_recipe = recipe(*LOFTQ_RECIPE)
    model = get_peft_model(load_pretrained(tiny_checkpoint), LoraConfig(
        target_modules="all-linear", r=4, lora_alpha=4, **{k: loftq_recipe.adapter.options[k] for k in
                                                           ("init_lora_weights", "loftq_config")}))
    quantize_after_loftq(model, loftq_recipe.model)
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert len(bases) == 7 * LLAMA["num_hidden_layers"]
    assert all(isinstance(b, QuantLinear) and b.method == "nf4" for b in bases)


@pytest.mark.parametrize("overrides, message", [
    (LOFTQ_RECIPE[:2], r'set loftq_bits = 4 with quantize = "nf4" or loftq_bits = 8 with quantize = "int8" '
                       r"\(got loftq_bits = 4, \[model\] quantize = None\)"),
    ((*LOFTQ_RECIPE[:2], 'model.quantize="int4"'), r"quantize = 'int4'"),
    ((LOFTQ_RECIPE[0], "adapter.loftq_config={loftq_bits = 8, loftq_iter = 1}", LOFTQ_RECIPE[2]),
     r"got loftq_bits = 8, \[model\] quantize = 'nf4'"),
    ((LOFTQ_RECIPE[0], "adapter.loftq_config={loftq_bits = 4, loftq_iter = 3}", LOFTQ_RECIPE[2]),
     r"loftq_iter = 3: a recipe takes loftq_iter = 1"),
])
def test_a_loftq_recipe_that_later_jobs_could_not_rebuild_is_refused(overrides, message):
    from peftcore.jobs.bases import TaskError, loftq_first

    with pytest.raises(TaskError, match=message) as err:
        loftq_first(recipe(*overrides))
    one_line(err)
