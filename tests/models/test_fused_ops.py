"""models/fused.py: every hand-written backward against autograd of the plain formula.

float64 gradcheck on tiny shapes (the derivation), fp32 against autograd through the plain ops
(what transformers runs), and the model-level loss against logits + F.cross_entropy.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftcore.models import fused
from peftcore.models.attention import build_attention_mask
from peftcore.models.llama import LlamaConfig, LlamaForCausalLM, rope_inverse_frequencies, rope_tables
from tests.tolerances import assert_close


def plain_rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_rope(x, cos, sin):
    """transformers: x * cos + rotate_half(x) * sin, with full-width tables."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def grads(fn, *inputs):
    """(output, gradients of inputs that require grad) for a fixed random output gradient."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, wanted, g)


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def tables(T, head_dim, dtype, batch=2):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=100.0)
    return rope_tables(rope_inverse_frequencies(config), torch.arange(T)[None].expand(batch, T), dtype)


# -- gradcheck (float64) --------------------------------------------------------------------------

@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_gradcheck(weight_trains):
    x = leaf(2, 3, 8, dtype=torch.float64)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_(weight_trains)
    assert torch.autograd.gradcheck(lambda a, b: fused.RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_silu_mul_gradcheck():
    gate, up = leaf(2, 3, 7, dtype=torch.float64), leaf(2, 3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(fused.SiluMulFunction.apply, (gate, up))


def test_rope_gradcheck():
    cos, sin = tables(5, 6, torch.float64)
    x = leaf(2, 5, 3, 6, dtype=torch.float64).transpose(1, 2)  # (B, heads, T, hd) view, as in attention
    assert torch.autograd.gradcheck(lambda a: fused.RopeFunction.apply(a, cos, sin), (x,))


@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_cross_entropy_gradcheck(monkeypatch, weight_trains):
    """Odd sizes and tiny chunks: several row blocks, vocabulary chunks and a short last chunk."""
    monkeypatch.setattr(fused, "CE_MAX_ROWS", 4)
    monkeypatch.setattr(fused, "CE_MIN_COLS", 3)
    monkeypatch.setattr(fused, "CE_CHUNK_BYTES", 8 * 4 * 3)
    monkeypatch.setattr(fused, "CE_MIN_ROWS", 3)
    hidden = leaf(9, 5, dtype=torch.float64)
    weight = leaf(11, 5, dtype=torch.float64, scale=2.0).requires_grad_(weight_trains)
    targets = torch.tensor([0, 10, 3, -100, 7, 7, 1, -100, 5])
    assert torch.autograd.gradcheck(lambda h, w: fused.linear_cross_entropy(h, w, targets), (hidden, weight))


# -- fp32 against autograd of the plain formula ----------------------------------------------------

@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_matches_plain_autograd(weight_trains):
    x, w = leaf(3, 5, 64), (torch.rand(64) + 0.5).requires_grad_(weight_trains)
    ours, our_grads = grads(lambda a, b: fused.rms_norm(a, b, 1e-6), x, w)
    ref, ref_grads = grads(lambda a, b: plain_rms_norm(a, b, 1e-6), x, w)
    assert torch.equal(ours, ref)  # the same ops in the same order
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert_close(a, b)


def test_rms_norm_keeps_input_dtype_rules_in_bf16():
    x, w = torch.randn(4, 32).bfloat16().requires_grad_(), torch.rand(32).requires_grad_()  # fp32 scale
    ours, our_grads = grads(lambda a, b: fused.rms_norm(a, b, 1e-6), x, w)
    ref, ref_grads = grads(lambda a, b: plain_rms_norm(a, b, 1e-6), x, w)
    assert ours.dtype == ref.dtype == torch.float32 and torch.equal(ours, ref)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert a.dtype == b.dtype
        assert_close(a.float(), b.float(), dtype=torch.bfloat16)


def test_silu_mul_matches_plain_autograd():
    gate, up = leaf(2, 9, 48), leaf(2, 9, 48)
    ours, our_grads = grads(fused.silu_mul, gate, up)
    ref, ref_grads = grads(lambda g, u: F.silu(g) * u, gate, up)
    assert torch.equal(ours, ref)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert_close(a, b)


def test_rope_matches_transformers_formula_and_keeps_the_layout():
    cos, sin = tables(7, 16, torch.float32)
    x = leaf(2, 7, 3, 16).transpose(1, 2)  # q / k as attention builds them: a view of (B, T, heads, hd)
    ours, (our_grad,) = grads(fused.rope, x, cos, sin)
    ref, (ref_grad,) = grads(plain_rope, x, cos, sin)
    assert torch.equal(ours, ref)  # the same products and sums
    assert_close(our_grad, ref_grad)
    assert ours.stride() == x.stride()  # no copy to another layout on the way in or back


def test_linear_cross_entropy_matches_logits_then_cross_entropy():
    hidden, weight = leaf(37, 24), leaf(1000, 24, scale=0.5)
    targets = torch.randint(0, 1000, (37,))
    targets[::5] = -100
    ours, our_grads = grads(lambda h, w: fused.linear_cross_entropy(h, w, targets), hidden, weight)
    ref, ref_grads = grads(lambda h, w: F.cross_entropy(F.linear(h, w), targets, reduction="sum"), hidden, weight)
    assert_close(ours, ref)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert_close(a, b)
    with torch.no_grad():  # the evaluation path: loss only
        assert_close(fused.linear_cross_entropy(hidden, weight, targets), ref)


def test_linear_cross_entropy_is_exact_for_confident_rows():
    """A target with probability ~1: dh = softmax W - W[t] is a small difference of large terms
    unless formed as in vocab_chunks; it must match float64 as well as the plain fp32 path does."""
    weight = torch.randn(300, 16) * 3
    hidden = (weight[:20] * 4).clone().requires_grad_()  # row i points at class i: p(target) ~ 1
    targets = torch.arange(20)
    ours = torch.autograd.grad(fused.linear_cross_entropy(hidden, weight, targets), hidden)[0]
    h64 = hidden.detach().double().requires_grad_()
    exact = torch.autograd.grad(F.cross_entropy(h64 @ weight.double().T, targets, reduction="sum"), h64)[0]
    plain = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), hidden)[0]
    assert (ours.double() - exact).abs().max() <= max((plain.double() - exact).abs().max(), 1e-6)


@pytest.mark.parametrize("slope", [20.0, 2000.0])
def test_linear_cross_entropy_when_logits_climb_across_vocabulary_chunks(monkeypatch, slope):
    """Logits rising along the vocabulary: at slope 2000 each chunk's logits overtake the shift
    from the chunks before by far more than CE_SUM_LIMIT allows, so every chunk takes the
    raise-the-shift path; at slope 20 none after the first does. Both must equal float64."""
    monkeypatch.setattr(fused, "CE_MIN_COLS", 256)
    monkeypatch.setattr(fused, "CE_CHUNK_BYTES", 16 * 4 * 256)
    raises = []
    original = fused.OnlineSoftmax.raise_shift
    monkeypatch.setattr(fused.OnlineSoftmax, "raise_shift", lambda self, z: raises.append(1) or original(self, z))
    weight = torch.linspace(-1, 1, 4096)[:, None] * torch.ones(4096, 8) * slope / 8
    hidden, targets = torch.ones(16, 8, requires_grad=True), torch.randint(0, 4096, (16,))
    loss = fused.linear_cross_entropy(hidden, weight, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_()
    exact = F.cross_entropy(h64 @ weight.double().T, targets, reduction="sum")
    assert len(raises) == (16 if slope > 100 else 1)
    assert_close(loss, exact.float())
    assert_close(grad, torch.autograd.grad(exact, h64)[0].float(), rtol=1e-5, atol=1e-4 * slope / 20)


def test_linear_cross_entropy_with_every_target_ignored_is_zero_and_backpropagates():
    hidden, weight = leaf(4, 8), leaf(10, 8)
    loss = fused.linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and not hidden.grad.any() and not weight.grad.any()


# -- the model's loss path ---------------------------------------------------------------------------

def tiny_model(**overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config)


def reference_loss(model, ids, labels, mask=None):
    logits = model(ids, attention_mask=mask)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("head", ["fused", "fallback"])
def test_labels_give_the_summed_shifted_cross_entropy_and_its_gradients(head):
    model = tiny_model()
    if head == "fallback":  # a head that is not a plain nn.Linear (as under LoRA on lm_head)
        model.lm_head = nn.Sequential(model.lm_head)
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    labels[2, :3] = -100
    loss = model(ids, attention_mask=mask, labels=labels)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = reference_loss(model, ids, labels, mask)
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss)
    for (name, _), a, b in zip(model.named_parameters(), ours, ref, strict=True):
        assert_close(a, b, msg=name)


def test_labels_path_with_a_frozen_model_backpropagates_into_inputs_embeds():
    model = tiny_model(tie_word_embeddings=True).requires_grad_(False)
    embeds = torch.randn(2, 6, 32, requires_grad=True)
    labels = torch.randint(0, 97, (2, 6))
    (ours,) = torch.autograd.grad(model(inputs_embeds=embeds, labels=labels), embeds)
    logits = model(inputs_embeds=embeds)
    ref_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    (ref,) = torch.autograd.grad(ref_loss, embeds)
    assert_close(ours, ref)


def test_an_all_ones_mask_takes_the_causal_fast_path_and_a_wrong_length_still_fails():
    assert build_attention_mask(torch.ones(2, 5, dtype=torch.long), 5, 0, True, torch.device("cpu")) is None
    assert build_attention_mask(torch.ones(2, 5), 5, 0, False, torch.device("cpu")) is None
    cached = build_attention_mask(torch.ones(1, 7), 2, 5, True, torch.device("cpu"))  # decoding: still causal
    assert cached.shape == (1, 1, 2, 7) and not cached[0, 0, 0, 6] and cached[0, 0, 1, 6]
    with pytest.raises(ValueError, match="covers 4 positions but cache \\+ input hold 5"):
        build_attention_mask(torch.ones(1, 4), 5, 0, True, torch.device("cpu"))
    model, ids = tiny_model(), torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))
