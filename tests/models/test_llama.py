"""Llama-family models (Llama 2/3, Mistral, Qwen2) against transformers, plus invariants.

Every model is a tiny random transformers model saved with `save_pretrained` and loaded with our
`load_pretrained`, so the comparisons also cover key names, transposes and config parsing. All
weights (norm scales and biases too) are perturbed away from their init: a Qwen2 whose biases are
still zero would pass even if we dropped them.
"""
import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from peftcore.models import from_config, generate, load_pretrained, save_pretrained
from peftcore.models.generate import SamplingConfig, positions_from_mask
from peftcore.models.llama import LlamaConfig, rope_inverse_frequencies
from tests.models.invariants import check_padded_rows_equal_alone
from tests.tolerances import assert_close

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
)
LLAMA3_ROPE = {
    # original context 64 puts the 4 frequencies of head_dim 8 into all three llama3 bands
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
FAMILIES = {
    "llama_gqa": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "llama_one_kv_head": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=1),
    "llama_tied": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4),
    "qwen2_bias": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
}



class Pair:
    """A transformers model and ours, loaded from the same saved folder."""

    def __init__(self, hf, ours, path):
        self.hf, self.ours, self.path = hf, ours, path


def make_pair(name: str, path) -> Pair:
    torch.manual_seed(sorted(FAMILIES).index(name))
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]()).eval()
    with torch.no_grad():
        for p in hf.parameters():  # tied weights are listed once
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)
    return Pair(hf, load_pretrained(path), path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Lazily built pairs, shared by every test (hypothesis included) in this module."""
    built: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in built:
            built[name] = make_pair(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def pair(request, pairs) -> Pair:
    return pairs(request.param)


def left_padded(lengths: list[int], total: int, seed: int = 0):
    """Random ids (pad slots hold token 0) and the 0/1 mask for rows of `lengths` real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


# ---- against transformers -------------------------------------------------------------------

@torch.no_grad()
def test_logits_match_transformers(pair):
    ids = torch.randint(0, VOCAB, (2, 12))
    assert_close(pair.ours(ids), pair.hf(ids).logits)


@torch.no_grad()
def test_left_padded_batch_matches_transformers_on_real_positions(pair):
    ids, mask = left_padded([12, 7, 3], 12)
    positions = positions_from_mask(mask)
    ours = pair.ours(ids, attention_mask=mask, position_ids=positions)
    theirs = pair.hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # pad positions are garbage in both and never used
    assert_close(ours[real], theirs[real])


def test_greedy_generate_matches_transformers_with_left_padding(pair):
    ids, mask = left_padded([9, 5], 9, seed=1)
    ours = generate(pair.ours, ids, max_new_tokens=8, attention_mask=mask)
    theirs = pair.hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_greedy_generate_stops_at_eos_like_transformers(pair):
    ids, mask = left_padded([9, 5], 9, seed=2)
    free = generate(pair.ours, ids, max_new_tokens=8, attention_mask=mask)
    # The token each row emits at step 3 becomes an EOS: both rows stop by then, so decoding ends early.
    eos = free[:, 9 + 3].tolist()
    ours = generate(pair.ours, ids, max_new_tokens=8, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    theirs = pair.hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    assert ours.shape[1] <= 9 + 4
    assert torch.equal(ours, theirs)
    for row in ours[:, 9:]:
        stop = next(i for i, t in enumerate(row.tolist()) if t in eos)
        assert (row[stop + 1:] == 0).all()  # finished rows are padded after their EOS


@torch.no_grad()
def test_sliding_window_is_exercised(pairs):
    """Sequence 12 > window 4: dropping the window must change the logits, else the test above proves nothing."""
    model = pairs("mistral_window").ours
    ids = torch.randint(0, VOCAB, (1, 12))
    windowed = model(ids)
    model.config.sliding_window = None
    try:
        unwindowed = model(ids)
    finally:
        model.config.sliding_window = 4
    assert_close(windowed[:, :4], unwindowed[:, :4])  # nothing falls outside the window yet
    assert not torch.allclose(windowed[:, 4:], unwindowed[:, 4:], atol=1e-4)


def test_llama3_scaling_rescales_frequencies(pairs):
    config = pairs("llama3_rope").ours.config
    plain = LlamaConfig(**{**COMMON, "rope_scaling": None})
    scaled, default = rope_inverse_frequencies(config), rope_inverse_frequencies(plain)
    assert scaled[0] == default[0]  # the shortest wavelength is kept
    assert torch.allclose(scaled[-1], default[-1] / 8)  # the longest is stretched by `factor`
    assert default[1] / 8 < scaled[1] < default[1]  # the middle band is interpolated


def test_training_path_equals_inference_path_and_backpropagates(pairs):
    """Inference reuses buffers in place (MLP, norms); with autograd it must not, and
    both must give the same numbers."""
    model = pairs("qwen2_bias").ours
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.inference_mode():
        expected = model(ids)
    logits = model(ids)
    assert logits.requires_grad
    assert torch.equal(logits.detach(), expected)
    logits.logsumexp(-1).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_frozen_model_backpropagates_into_inputs_embeds(pairs):
    """Prompt tuning: every weight frozen, the gradient flows through activations only."""
    model = pairs("llama_gqa").ours
    embeds = model.model.embed_tokens(torch.randint(0, VOCAB, (2, 7))).detach()
    with torch.inference_mode():
        expected = model(inputs_embeds=embeds)
    model.requires_grad_(False)
    try:
        embeds.requires_grad_(True)
        logits = model(inputs_embeds=embeds)
        logits.logsumexp(-1).sum().backward()
    finally:
        model.requires_grad_(True)
    assert torch.equal(logits.detach(), expected)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


# ---- sampling -------------------------------------------------------------------------------

def sample(model, ids, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return generate(model, ids, max_new_tokens=10, generator=g, **kwargs)


def test_sampling_is_reproducible_with_a_seeded_generator(pairs):
    model = pairs("llama_gqa").ours
    ids = torch.randint(3, VOCAB, (2, 5))
    first = sample(model, ids, seed=7, temperature=1.0)
    assert torch.equal(first, sample(model, ids, seed=7, temperature=1.0))
    assert not torch.equal(first, sample(model, ids, seed=8, temperature=1.0))  # the generator is used


def test_a_sampling_config_decodes_as_its_keywords_and_keywords_override_it(pairs):
    model = pairs("llama_gqa").ours
    ids = torch.randint(3, VOCAB, (2, 5))
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=5, eos_token_id=[])
    assert torch.equal(sample(model, ids, seed=7, sampling=config), sample(model, ids, seed=7, temperature=1.0, top_k=5,
                                                                             eos_token_id=[]))
    greedy = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=6, temperature=0.0, sampling=config), greedy)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-0.5)


def test_top_k_one_and_tiny_top_p_equal_greedy(pairs):
    model = pairs("qwen2_bias").ours
    ids = torch.randint(3, VOCAB, (2, 5))
    greedy = generate(model, ids, max_new_tokens=10)
    assert torch.equal(sample(model, ids, seed=3, temperature=1.5, top_k=1), greedy)
    assert torch.equal(sample(model, ids, seed=3, temperature=1.5, top_p=1e-6), greedy)
    # as transformers: top token kept
    assert torch.equal(sample(model, ids, seed=3, temperature=1.5, top_p=0.0), greedy)


def test_top_k_zero_is_off_and_bad_filters_are_errors(pairs):
    model = pairs("qwen2_bias").ours
    ids = torch.randint(3, VOCAB, (2, 5))
    assert torch.equal(sample(model, ids, seed=4, temperature=1.0, top_k=0),
                       sample(model, ids, seed=4, temperature=1.0))
    for bad in ({"top_k": -1}, {"top_p": 1.5}, {"top_p": -0.1}):
        with pytest.raises(ValueError, match="top_k must be >= 0 and top_p in \\[0, 1\\]"):
            sample(model, ids, seed=4, temperature=1.0, **bad)


def test_generate_stops_at_the_configs_eos_unless_told_otherwise(pairs):
    """transformers' generate stops at config.eos_token_id when the call names none; so does ours."""
    pair = pairs("qwen2_bias")
    ids = torch.randint(3, VOCAB, (1, 5))
    free = generate(pair.ours, ids, max_new_tokens=8, eos_token_id=[])  # [] never stops
    eos = int(free[0, 5 + 2])
    config_eos = pair.ours.config.eos_token_id
    try:
        pair.ours.config.eos_token_id = pair.hf.config.eos_token_id = pair.hf.generation_config.eos_token_id = eos
        ours = generate(pair.ours, ids, max_new_tokens=8)
        theirs = pair.hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    finally:
        pair.ours.config.eos_token_id = config_eos
        pair.hf.config.eos_token_id = pair.hf.generation_config.eos_token_id = config_eos
    first = free[0, 5:].tolist().index(eos)
    assert ours.shape[1] == 5 + first + 1 and torch.equal(ours, theirs[:, : ours.shape[1]])


# ---- invariants (hypothesis) ----------------------------------------------------------------

family_names = st.sampled_from(sorted(FAMILIES))
tokens = st.integers(0, VOCAB - 1)


@given(name=family_names, data=st.data())
@torch.no_grad()
def test_future_tokens_never_change_past_logits(pairs, name, data):
    model = pairs(name).ours
    length = data.draw(st.integers(2, 12), label="length")
    cut = data.draw(st.integers(1, length - 1), label="cut")
    ids = torch.tensor([data.draw(st.lists(tokens, min_size=length, max_size=length), label="ids")])
    future = data.draw(st.lists(tokens, min_size=length - cut, max_size=length - cut), label="future")
    changed = ids.clone()
    changed[0, cut:] = torch.tensor(future)
    assert_close(model(changed)[:, :cut], model(ids)[:, :cut])


@given(name=family_names, data=st.data())
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(pairs, name, data):
    model = pairs(name).ours
    length = data.draw(st.integers(2, 12), label="length")
    lengths = data.draw(st.lists(st.integers(1, length), min_size=1, max_size=2), label="real lengths")
    lengths[0] = length  # at least one unpadded row
    ids, mask = left_padded(lengths, length, seed=data.draw(st.integers(0, 99), label="seed"))
    positions = positions_from_mask(mask)
    full = model(ids, attention_mask=mask, position_ids=positions)
    cache, pieces, start = model.new_cache(), [], 0
    while start < length:  # a prefill, then chunks of drawn sizes (1 = one token per step)
        end = start + data.draw(st.integers(1, length - start), label="chunk")
        pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end],
                            position_ids=positions[:, start:end], cache=cache))
        start = end
    real = mask.bool()
    assert_close(torch.cat(pieces, dim=1)[real], full[real])


@given(name=family_names, data=st.data())
@torch.no_grad()
def test_left_padded_row_equals_the_row_unpadded(pairs, name, data):
    model = pairs(name).ours
    rows = data.draw(st.lists(st.lists(tokens, min_size=1, max_size=10), min_size=1, max_size=3), label="rows")
    pad_id = data.draw(tokens, label="pad id")  # whatever sits in pad slots must not matter
    check_padded_rows_equal_alone(model, rows, pad_id, data.draw(st.integers(0, 3), label="extra padding"))


@given(name=family_names, seed=st.integers(0, 2**16), ids=st.lists(tokens, min_size=1, max_size=8))
@torch.no_grad()
def test_save_load_round_trip_is_exact_and_transformers_reads_it(pairs, name, seed, ids):
    model = pairs(name).ours
    torch.manual_seed(seed)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for p in model.parameters():  # new weights each example, so a stale file cannot pass
            p.add_(torch.randn_like(p) * 0.01)
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(model, folder)
            again = load_pretrained(folder)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
            config = json.loads((Path(folder) / "config.json").read_text())
        # transformers 5 reads rope_parameters; 4.x reads only the top-level keys (else theta 10000)
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.config.rope_theta
        assert config["rope_scaling"] == model.config.rope_scaling
        state, reloaded = model.state_dict(), again.state_dict()
        assert state.keys() == reloaded.keys()
        assert all(torch.equal(state[k], reloaded[k]) for k in state)
        x = torch.tensor([ids])
        expected = model(x)
        assert torch.equal(again(x), expected)
        assert_close(theirs(x).logits, expected)
    finally:
        model.load_state_dict(snapshot)


def test_from_config_keeps_rope_frequencies_fp32_in_a_bf16_model():
    model = from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, rope_theta=5e5), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.inv_freq, rope_inverse_frequencies(model.config), rtol=0, atol=0)
