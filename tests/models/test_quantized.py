"""Quantized base weights: loading while quantizing, storage, dtypes, and QLoRA against HF PEFT + bitsandbytes."""
import copy
import logging
import sys
import warnings

import bitsandbytes.functional as bnb
import peft
import pytest
import torch
import transformers

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.models import load_pretrained, save_pretrained
from peftcore.models.quantized import QuantLinear, quantization_report, quantize_model
from tests.models import rss
from tests.tolerances import assert_close

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return folder, hf


def bnb_rounded(weight: torch.Tensor) -> torch.Tensor:
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return bnb.dequantize_4bit(packed, state)


def test_nf4_loading_equals_bitsandbytes_bit_for_bit(llama):
    folder, hf = llama
    model = load_pretrained(folder, quantize="nf4")
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and not isinstance(model.lm_head, QuantLinear)
    expected = bnb_rounded(hf.model.layers[1].self_attn.q_proj.weight.detach())
    assert torch.equal(q_proj.dequantize(), expected)
    x = torch.randn(3, 64)
    assert_close(q_proj(x), x @ expected.T)


def test_nf4_stores_under_030_of_bf16_and_keeps_scales_fp32(llama):
    folder, _ = llama
    model = load_pretrained(folder, quantize="nf4")
    report = quantization_report(model)
    assert report["layers"] == 2 * 7 and report["ratio_to_bf16"] <= 0.30
    model.to(torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.absmax.dtype == torch.float32 and layer.packed.dtype == torch.uint8
    assert layer.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("method, group_size", [("int4", 32), ("int4", 64), ("int8", None), ("nf4", None)])
def test_load_time_quantization_equals_quantize_model(llama, method, group_size):
    folder, _ = llama
    loaded = load_pretrained(folder, quantize=method, group_size=group_size)
    in_memory = quantize_model(load_pretrained(folder), method, group_size)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), in_memory(ids))
        dense = load_pretrained(folder)(ids)
    assert (loaded(ids) - dense).abs().max() > 0  # quantization really happened


def test_int4_group_that_does_not_divide_in_features_is_a_clear_error(llama):
    folder, _ = llama
    with pytest.raises(ValueError, match="in_features 64 is not a multiple of group_size 48"):
        load_pretrained(folder, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="quantize='fp8' is not supported"):
        load_pretrained(folder, quantize="fp8")


def test_int4_without_a_group_size_takes_the_largest_power_of_two_that_divides_the_width(caplog):
    """SmolLM2's 576-wide layers: 128 does not divide 576, 64 does (and the log says so, once)."""
    from peftcore.models.quantized import QuantLinear, announce_group_size

    announce_group_size.cache_clear()
    logger = logging.getLogger("peftcore")
    logger.addHandler(caplog.handler)  # the CLI's handler stops propagation to the root, where caplog listens
    try:
        with caplog.at_level("INFO", logger="peftcore"):
            layers = [QuantLinear(576, 8, "int4"), QuantLinear(576, 8, "int4"), QuantLinear(1536, 8, "int4")]
    finally:
        logger.removeHandler(caplog.handler)
    assert [layer.group_size for layer in layers] == [64, 64, 128]
    assert {r.getMessage() for r in caplog.records} == {
        "int4: group size 64 for 576-wide layers (128 does not divide 576; set group_size to choose another)"}
    assert announce_group_size.cache_info().misses == 1  # said once for the two 576-wide layers
    assert QuantLinear(576, 8, "int4", group_size=32).group_size == 32  # the user's choice stands
    weight = torch.randn(8, 576)
    layer = QuantLinear(576, 8, "int4")
    layer.load_dense_weight(weight)
    assert (layer.dequantize() - weight).abs().max() < 0.2 * weight.abs().max()  # it quantizes, not just builds


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qlora_logits_equal_transformers_with_bnb_rounded_weights_and_hf_peft(llama, tmp_path, use_dora):
    """The reference: transformers' model whose quantized linears hold bitsandbytes' NF4 rounding,
    with HF PEFT applying the same adapter file. Ours: NF4 loading + our LoRA (or DoRA, whose column
    norms then come from the dequantized weight) on top."""
    folder, hf = llama
    reference = copy.deepcopy(hf)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.copy_(bnb_rounded(module.weight))
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                            use_dora=use_dora)).eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_pretrained(folder, quantize="nf4"), tmp_path)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits)


def test_qlora_trains_only_the_adapter_and_merges_to_a_dense_model(llama, tmp_path):
    folder, hf = llama
    pm = get_peft_model(load_pretrained(folder, quantize="nf4"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 6))
    pm(ids).sum().backward()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(pm.get_parameter(n).grad is not None for n in trainable)
    with torch.no_grad():
        adapted = pm(ids)
    merged = pm.merge_and_unload()
    # dense everywhere, the layers no adapter targeted (k_proj, o_proj, the MLP) included
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(ids), adapted)
    assert set(pm.merge_report) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert all(0 < err < 0.2 for err in pm.merge_report.values())
    save_pretrained(merged, tmp_path / "merged")  # a plain checkpoint: transformers finds every weight
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert_close(reloaded(ids).logits, adapted)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    return folder, hf


def test_gpt2_conv1d_layers_quantize_and_take_hf_peft_adapters(gpt2, tmp_path):
    """GPT-2 stores its projections (in, out) in Conv1D: they quantize as the (out, in) transpose,
    equal bitsandbytes' NF4 of that transpose, take an HF PEFT adapter (fan_in_fan_out=True), and merge
    back into Conv1D layers that transformers loads."""
    folder, hf = gpt2
    model = load_pretrained(folder, quantize="nf4")
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), quantize_model(load_pretrained(folder), "nf4")(ids))  # load-time == in memory
    reference = copy.deepcopy(hf)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, transformers.pytorch_utils.Conv1D):
                module.weight.copy_(bnb_rounded(module.weight.T.contiguous()).T)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                            fan_in_fan_out=True, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = PeftModel.from_pretrained(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = theirs(ids).logits
        assert_close(ours(ids), expected)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    assert set(ours.merge_report) == {
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    }
    assert all(0 < err < 0.2 for err in ours.merge_report.values())
    assert (type(merged.transformer.h[0].attn.c_attn).__name__
            == type(merged.transformer.h[0].mlp.c_fc).__name__ == "Conv1D")
    save_pretrained(merged, tmp_path / "merged")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected)


# ~110 MB of fp32 linear weights and a small vocabulary, so the linears dominate the checkpoint.
BIG = dict(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=8)

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.slow
def test_quantized_loading_peaks_near_the_quantized_size(tmp_path):
    """QLoRA's point: dense weights never all sit in memory. Measured growth ~0.35x of the fp32
    checkpoint: the NF4 model (0.14x), one dense tensor with its chunked quantization scratch
    (~0.1x here), and the fixed cost of building the model (~0.1x, the same for dense loading,
    which grows by ~1.1x). Before chunking and heap trimming it measured 0.4-1.05x."""
    rss.save_random_llama(BIG, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    imports = "from peftcore.models import load_pretrained\nimport peftcore.kernels.quant, peftcore.models.quantized"
    growth = rss.growth_bytes(
        rss.start_growth(imports, 'model = load_pretrained(sys.argv[1], quantize="nf4")', str(tmp_path))
    ) / size
    print(f"nf4 loading grew RSS by {growth:.3f}x the fp32 checkpoint")
    assert growth < 0.5, f"loading with quantize='nf4' grew RSS by {growth:.2f}x the fp32 checkpoint"


def test_trainable_parameter_share_counts_a_4bit_weight_as_its_dense_size(tmp_path):
    """HF PEFT counts a 4-bit weight by its dense size; the packed codes are buffers here, so the
    count must add them back: the total equals the dense model's."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    dense = get_peft_model(load_pretrained(tmp_path), config).get_nb_trainable_parameters()
    quantized = get_peft_model(load_pretrained(tmp_path, quantize="nf4"), config).get_nb_trainable_parameters()
    assert quantized == dense and dense[0] == 2 * 4 * (64 + 64)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_a_frozen_quantized_linear_keeps_no_dense_weight_for_backward(method):
    """The input gradient through a frozen quantized layer (a QLoRA layer without an adapter)
    dequantizes again in backward: nothing of the weight's (out, in) shape is saved."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), method, group_size=32 if method == "int4" else None)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (48, 64) not in saved
    y.backward(torch.ones_like(y))
    assert_close(x.grad, torch.ones(5, 48) @ layer.dequantize())
