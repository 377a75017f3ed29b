"""The quantization spec (kernels/quant.py): NF4 bit-exact with bitsandbytes, int4 / int8 against
their formulas written out here, packing, the double-quantization error bound, errors."""
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore.kernels import quant as Q

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numel: 1, odd (15, 63, 2145), even but not a multiple of 64 (130), multiples of 64 (4096, 21000)
SHAPES = [(1, 1), (3, 5), (7, 9), (2, 65), (33, 65), (64, 64), (300, 70)]


def bnb_nf4(w: torch.Tensor, double_quant: bool):
    """bitsandbytes' packed codes and state for w, and its dequantization of them (shaped like w)."""
    def quantize(t):
        return bnb_functional.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    packed, state = quantize(w)
    # Its native CPU dequantize_4bit (0.50.2) takes the wrong absmax when rows are a multiple of 16
    # long but not of 64, so blocks straddle rows ((5, 16): the tail block got the first one's).
    # The flattened weight has the same codes and absmax in one row, which it dequantizes right.
    # Eager: on CPU it runs under torch.compile, which recompiles for every shape (seconds each).
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with eager:
        dense = bnb_functional.dequantize_4bit(*quantize(w.reshape(-1)))
    return packed.view(-1), state, dense.reshape(w.shape)


def assert_nf4_equal(w: torch.Tensor, double_quant: bool) -> None:
    ours = Q.nf4_quantize(w, double_quant=double_quant)
    packed, state, dense = bnb_nf4(w, double_quant)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)  # uint8 codes when double-quantized
    if double_quant:
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(Q.nf4_dequantize(ours, w.dtype), dense)


def test_nf4_code_is_bitsandbytes():
    assert torch.equal(Q.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(Q.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(sum(shape))
    assert_nf4_equal(torch.randn(shape).to(dtype), double_quant)


@given(rows=st.integers(1, 40), cols=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       double_quant=st.booleans(), log_scale=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_nf4_bit_exact_hypothesis(rows, cols, dtype, double_quant, log_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    assert_nf4_equal((torch.randn(rows, cols, generator=gen) * 10**log_scale).to(dtype), double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bit_exact_past_the_chunk_size(double_quant):
    """Tensors above quant.NF4_CHUNK elements are quantized chunk by chunk (bounded scratch memory):
    the seams must not show (600 x 512 = 307,200 elements; 513 x 513 ends mid-block)."""
    for shape in ((600, 512), (513, 513)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        assert w.numel() > Q.NF4_CHUNK
        assert_nf4_equal(w, double_quant)


def test_nf4_zero_block_and_constant_absmaxes():
    """A block of zeros (absmax 0) and all-equal absmaxes (double-quant scale 0) still match."""
    w = torch.randn(3, 70)
    w.view(-1)[64:128] = 0
    for dq in (False, True):
        assert_nf4_equal(w, dq)
        assert_nf4_equal(torch.full((3, 64), -0.5), dq)


def grid_interval_width(v: torch.Tensor) -> torch.Tensor:
    """Width of the dynamic-map interval holding each v (the outermost one beyond the ends)."""
    code = Q.dynamic_map()
    i = torch.searchsorted(code, v).clamp(1, code.numel() - 1)
    return code[i] - code[i - 1]


@given(n_blocks=st.integers(1, 700), spread=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_double_quant_error_bound(n_blocks, spread, seed):
    """|absmax' - absmax| <= (half a dynamic-map step + half a LUT bin) * the absmax block's scale.

    The LUT bin: bitsandbytes' CPU quantizer (hence the spec) first rounds the normalized value to
    a 65536-point grid on [-1, 1] (at most 1/65535 away), then takes the code nearest that point,
    so the step that counts is the widest within 1/65535 of the value (steps grow with |value|).
    """
    gen = torch.Generator().manual_seed(seed)
    block_scales = torch.exp(torch.randn(n_blocks, 1, generator=gen) * spread)
    w = torch.randn(n_blocks, 64, generator=gen) * block_scales
    plain, dq = Q.nf4_quantize(w), Q.nf4_quantize(w, double_quant=True)
    scale = Q.expand_blocks(dq.absmax_scale, Q.ABSMAX_BLOCK, n_blocks)
    centred = plain.absmax - dq.absmax_offset
    v = centred / torch.where(scale > 0, scale, 1.0)
    bin_half = 1.0 / (Q.LUT_SIZE - 1)
    step = torch.maximum(grid_interval_width(v - bin_half), grid_interval_width(v + bin_half))
    bound = (step / 2 + bin_half) * scale + 1e-6 * plain.absmax
    assert ((Q.nf4_absmax(dq) - plain.absmax).abs() <= bound).all()


def int4_by_formula(w: torch.Tensor, group: int):
    """Per group: scale = (max - min) / 15 (a constant group: |c| / 15, at least 1e-30),
    zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15), w' = (q - zero) * scale."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.min(dim=-1, keepdim=True).values, g.max(dim=-1, keepdim=True).values
    scale = (hi - lo) / 15
    scale = torch.where(scale == 0, torch.clamp(hi.abs() / 15, min=1e-30), scale)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
    return q.reshape(N, K), scale[..., 0], zero[..., 0], ((q - zero) * scale).reshape(N, K)


@given(rows=st.integers(1, 12), groups=st.integers(1, 4), group=st.sampled_from([2, 32, 64, 128]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_int4_matches_formula(rows, groups, group, dtype, seed):
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[0, :group] = 0.25  # a constant group: the range is 0, the value is kept exactly
    ours = Q.int4_quantize(w, group)
    q, scale, zero, dense = int4_by_formula(w, group)
    assert torch.equal(Q.unpack_nibbles(ours.packed), q.long())
    assert torch.equal(ours.scale, scale) and torch.equal(ours.zero, zero)
    assert torch.equal(Q.int4_dequantize(ours), dense)
    assert torch.equal(Q.int4_dequantize(ours, dtype), dense.to(dtype))
    assert (dense[0, :group] == 0.25).all()
    # rounding error: half a step, or a whole one where the rounded zero point clamps an end
    assert ((dense - w.float()).abs() <= Q.expand_blocks(scale.flatten(), group, w.numel()).view_as(w) * 1.0001).all()


@given(rows=st.integers(1, 12), cols=st.integers(1, 70), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_int8_matches_formula(rows, cols, dtype, seed):
    """scale = absmax / 127 per row (1 for an all-zero row), q = clamp(round(w / scale), -127, 127)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[0] = 0
    ours = Q.int8_quantize(w)
    absmax = w.float().abs().max(dim=1).values
    scale = torch.where(absmax > 0, absmax / 127, 1.0)
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127)
    assert ours.q.dtype == torch.int8 and torch.equal(ours.q, q.to(torch.int8))
    assert torch.equal(ours.scale, scale)
    assert torch.equal(Q.int8_dequantize(ours), q * scale[:, None])
    assert (Q.int8_dequantize(ours)[0] == 0).all()


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(shape, seed):
    shape[-1] *= 2
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed))
    packed = Q.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == shape[-1] // 2
    assert torch.equal(Q.unpack_nibbles(packed), codes)


def test_packing_puts_the_first_code_in_the_high_nibble():
    assert Q.pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]


@pytest.mark.parametrize("K, group, match", [
    (100, 64, r"in_features 100 is not a multiple of group_size 64; no standard group size divides it"),
    (96, 64, r"in_features 96 is not a multiple of group_size 64; group sizes that divide it: \[32\]"),
    (64, 3, r"group_size must be a positive even number, got 3"),
])
def test_int4_rejects_k_not_multiple_of_group(K, group, match):
    with pytest.raises(ValueError, match=match):
        Q.int4_quantize(torch.randn(4, K), group)
