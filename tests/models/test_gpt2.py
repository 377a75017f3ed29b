"""GPT-2 against transformers on tiny random configs: logits, padding, cache, generation, checkpoints."""
import json

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from peftcore.models import generate, load_pretrained, save_pretrained
from peftcore.models.generate import positions_from_mask
from peftcore.models.gpt2 import GPT2Config, GPT2LMHeadModel
from tests.models.invariants import check_padded_rows_equal_alone
from tests.tolerances import assert_close

VOCAB, PAD, EOS = 101, 0, 100


def tiny_hf(**overrides) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2, **overrides,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    # transformers initialises biases to 0 and LayerNorms to 1: perturb every tensor so that a
    # tensor loaded into the wrong place (or not at all) changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_pretrained(checkpoint_dir)


def left_padded_batch():
    """(3, 8) ids and mask; rows hold 8, 5 and 2 real tokens after their padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, EOS, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@torch.no_grad()
def test_loads_as_gpt2_with_tied_head(model):
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.h[1].attn.c_attn).__name__ == "Conv1D"
    assert model.transformer.h[1].attn.c_attn.weight.shape == (32, 96)  # (in, out)


@torch.no_grad()
def test_logits_match_transformers(model, hf_model):
    ids = torch.randint(0, VOCAB, (2, 11))
    assert_close(model(ids), hf_model(ids).logits)


@torch.no_grad()
def test_left_padded_logits_match_transformers(model, hf_model):
    ids, mask = left_padded_batch()
    positions = positions_from_mask(mask)
    ours = model(ids, attention_mask=mask, position_ids=positions)
    ref = hf_model(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(ours[real], ref[real])


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(model):
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_close(model(inputs_embeds=model.transformer.wte(ids)), model(ids))


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(model, hf_model, padded):
    ids, mask = left_padded_batch()
    if not padded:
        ids, mask = torch.randint(1, EOS, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    ours = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD)
    ref = hf_model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
    )
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(model):
    ids = torch.randint(0, VOCAB, (2, 10))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :6], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
    assert cache.seq_len == 10
    assert cache.keys[0].shape == (2, 4, 10, 8)  # (B, n_head, T, head_dim)
    assert_close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(model, tmp_path):
    save_pretrained(model, tmp_path)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert "lm_head.weight" not in header  # tied: stored once, as transformers does
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    assert_close(reloaded(ids).logits, model(ids))


@torch.no_grad()
def test_original_checkpoint_without_prefix_loads(hf_model, tmp_path):
    """OpenAI-converted files: no `transformer.` prefix, no lm_head, causal-mask buffers per layer."""
    n_pos = hf_model.config.n_positions
    state = {
        k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"
    }
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("architectures", None)  # dispatch on model_type alone
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (2, 7))
    assert_close(load_pretrained(tmp_path)(ids), hf_model(ids).logits)


@pytest.mark.parametrize(
    "options",
    [
        dict(activation_function="relu", n_inner=48, scale_attn_weights=False),
        dict(activation_function="gelu", scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-2),
        # eager: transformers' only path that honours reorder_and_upcast_attn
        dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True, attn_implementation="eager"),
    ],
)
@torch.no_grad()
def test_config_options_match_transformers(options, tmp_path):
    hf = tiny_hf(**options)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids, mask = left_padded_batch()
    positions = positions_from_mask(mask)
    real = mask.bool()
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert_close(ours(ids, attention_mask=mask, position_ids=positions)[real], ref[real])


def test_unsupported_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="activation_function 'swish' is not supported"):
        GPT2Config(activation_function="swish")
    with pytest.raises(ValueError, match="add_cross_attention"):
        GPT2Config.from_hf({"model_type": "gpt2", "add_cross_attention": True})


def test_config_round_trip_keeps_unknown_keys():
    hf = {"model_type": "gpt2", "hidden_size": 48, "n_head": 4, "summary_type": "cls_index", "n_inner": None}
    config = GPT2Config.from_hf(hf)
    assert (config.n_embd, config.inner_dim, config.extra) == (48, 192, {"summary_type": "cls_index"})
    assert GPT2Config.from_hf(config.to_hf()).to_hf() == config.to_hf()


def test_gradient_checkpointing_gives_same_gradients():
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, VOCAB, (2, 9))

    def grads():
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.transformer.gradient_checkpointing = True
    for a, b in zip(grads(), plain):
        assert_close(a, b)


# ---- invariants (hypothesis), as for the Llama family --------------------------------------------
tokens = st.integers(0, VOCAB - 1)


@given(data=st.data())
@torch.no_grad()
def test_future_tokens_never_change_past_logits(model, data):
    length = data.draw(st.integers(2, 12), label="length")
    cut = data.draw(st.integers(1, length - 1), label="cut")
    ids = torch.tensor([data.draw(st.lists(tokens, min_size=length, max_size=length), label="ids")])
    changed = ids.clone()
    changed[0, cut:] = torch.tensor(data.draw(st.lists(tokens, min_size=length - cut, max_size=length - cut)))
    assert_close(model(changed)[:, :cut], model(ids)[:, :cut])


@given(data=st.data())
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(model, data):
    """Learned absolute positions: each chunk's position_ids continue from the mask, as generate does."""
    length = data.draw(st.integers(2, 12), label="length")
    real = data.draw(st.integers(1, length), label="real tokens in row 2")
    ids = torch.tensor([data.draw(st.lists(tokens, min_size=length, max_size=length), label="ids")] * 2)
    mask = torch.ones_like(ids)
    mask[1, : length - real] = 0
    positions = positions_from_mask(mask)
    full = model(ids, attention_mask=mask, position_ids=positions)
    cache, pieces, start = model.new_cache(), [], 0
    while start < length:
        end = start + data.draw(st.integers(1, length - start), label="chunk")
        pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end],
                            position_ids=positions[:, start:end], cache=cache))
        start = end
    assert_close(torch.cat(pieces, dim=1)[mask.bool()], full[mask.bool()])


@given(rows=st.lists(st.lists(tokens, min_size=1, max_size=10), min_size=1, max_size=3), pad_id=tokens,
       extra=st.integers(0, 3))
@torch.no_grad()
def test_left_padded_row_equals_the_row_unpadded(model, rows, pad_id, extra):
    check_padded_rows_equal_alone(model, rows, pad_id, extra)
