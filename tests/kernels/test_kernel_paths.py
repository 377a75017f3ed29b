"""Model level: LoRA and QLoRA layers give the same logits through the Triton kernels (interpreted
on CPU) as through the torch path, and the kernels really ran."""
import pytest
import torch
import transformers

import peftcore.kernels.dispatch as dispatch
import peftcore.kernels.lora_matmul as lora_matmul_module
import peftcore.kernels.quant_matmul as quant_matmul_module
from peftcore import LoraConfig, get_peft_model
from peftcore.models import load_pretrained
from tests.kernels.interpreter import triton_interpreter
from tests.tolerances import assert_close

pytest.importorskip("triton")
import peftcore.kernels.gguf_matmul_kernels as gguf_kernels_module  # noqa: E402  (needs triton)
import peftcore.kernels.quant_matmul_kernels as quant_kernels_module  # noqa: E402

# reloaded in this order: gguf_matmul_kernels takes pieces of quant_matmul_kernels, quant_matmul both
MODULES = (quant_kernels_module, gguf_kernels_module, quant_matmul_module, lora_matmul_module)


@pytest.fixture(scope="module")
def interpreted():
    with triton_interpreter(*MODULES):
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)  # hidden 64: NF4 blocks of 64 stay inside rows, so the kernels take these layers
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("quantize", [None, "nf4", "int4"])
def test_lora_model_logits_and_grads_equal_through_either_path(interpreted, folder, quantize, monkeypatch):
    torch.manual_seed(1)
    pm = get_peft_model(load_pretrained(folder, quantize=quantize, group_size=32 if quantize == "int4" else None),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    ids = torch.randint(0, 40, (2, 5))
    kernel = count_calls(monkeypatch, quant_matmul_module if quantize else lora_matmul_module,
                         "quant_matmul" if quantize else "lora_matmul")
    triton_logits = pm(ids)
    triton_logits.sum().backward()
    triton_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert kernel, "the Triton path did not run"
    pm.zero_grad()
    monkeypatch.setattr(dispatch, "INTERPRET", False)  # now every layer takes the torch path
    torch_logits = pm(ids)
    torch_logits.sum().backward()
    assert_close(triton_logits, torch_logits)
    for name, grad in triton_grads.items():
        assert_close(grad, pm.get_parameter(name).grad)


def test_lora_on_kept_gguf_blocks_gives_the_same_logits_and_grads_through_the_kernels(interpreted, tmp_path,
                                                                                     monkeypatch):
    """quantize="keep" on a Q4_1 GGUF: the gguf_matmul kernels (forward and dX) against the torch path."""
    gguf = pytest.importorskip("gguf")
    from tests.models.test_gguf_llama import random_hf, write_gguf

    path = write_gguf(random_hf("llama_gqa"), tmp_path / "m.gguf", "llama", qtype=gguf.GGMLQuantizationType.Q4_1)
    pm = get_peft_model(load_pretrained(path, quantize="keep"),
                        LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 5))
    forward = count_calls(monkeypatch, gguf_kernels_module, "forward")
    transposed = count_calls(monkeypatch, gguf_kernels_module, "transposed")
    triton_logits = pm(ids)
    triton_logits.sum().backward()
    triton_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert forward and transposed, "the GGUF kernels did not run"
    pm.zero_grad()
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    torch_logits = pm(ids)
    torch_logits.sum().backward()
    assert_close(triton_logits, torch_logits)
    for name, grad in triton_grads.items():
        assert_close(grad, dict(pm.named_parameters())[name].grad)
