"""Weight quantization formats in pure torch: the spec every kernel must equal.

nf4  QLoRA's NormalFloat4 as bitsandbytes stores it: blocks of 64 consecutive weights (row-major,
     flattened) share one fp32 absmax; each weight becomes the index of the nearest of 16 code
     values of w / absmax; two indices per byte, the FIRST weight in the HIGH nibble. Optional
     double quantization stores the absmaxes minus their mean as uint8 codes of an 8-bit dynamic
     map, one fp32 scale per 256 absmaxes (codes rounded as bitsandbytes' CPU kernel rounds them:
     see dynamic_codes). Bit-exact with bitsandbytes' quantize_4bit on CPU.
int4 group-wise asymmetric over the input dimension: per group of `group_size` weights of a row,
     scale = (max - min) / 15, zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15),
     w' = (q - zero) * scale; packed like nf4 along each row. K must be a multiple of group_size.
int8 per-output-row absmax, symmetric: scale = absmax / 127, q = clamp(round(w / scale), -127, 127).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# bitsandbytes' get_4bit_type("nf4"): the quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_BLOCK = 64
ABSMAX_BLOCK = 256  # double quantization: absmaxes per second-level scale


@functools.cache
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015): 7 decades, finer near each power of 10.

    Decade i (0..6) holds 2^i evenly spaced magnitudes in [0.1, 1] * 10^(i-6), with both signs;
    plus 0 and 1: 2 * 127 + 2 = 256 values, sorted.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code`; a tie goes to the lower one (as bitsandbytes)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)  # int32: int64 would double the temporaries


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 2n) codes in 0..15 -> (..., n) uint8, element 2i in the high nibble."""
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) int64 codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2).long()


@functools.cache
def byte_table(values: tuple[float, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2) fp32: the values of a byte's high and low nibble, for decoding a byte per lookup.
    One embedding lookup per byte (8 bytes out) is ~2x faster on CPU than unpacking nibbles to
    int64 codes and gathering per element (4096 x 4096 NF4: 94 vs 184 ms, 1 thread)."""
    table = torch.tensor(values, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte >> 4], table[byte & 0xF]], dim=-1)


def decode_bytes(packed: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """(...,) uint8 -> (2 * numel,) fp32 nibble values, high nibble first."""
    return F.embedding(packed.reshape(-1).int(), byte_table(values, packed.device)).view(-1)


@dataclass
class NF4Weight:
    packed: torch.Tensor  # (ceil(numel / 2),) uint8
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 codes when double-quantized
    shape: tuple[int, ...]
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32: double quantization
    absmax_offset: torch.Tensor | None = None  # () fp32: the mean removed before double quantization

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None


def blockwise_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of `block` consecutive values (the last one may be short) -> fp32 absmax."""
    n = flat.numel()
    full = n - n % block
    absmax = flat[:full].view(-1, block).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax()[None]])
    return absmax


def expand_blocks(values: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """One value per block -> one per element (n elements)."""
    return values.repeat_interleave(block)[:n]


# Elements quantized at a time: bounds the fp32/int32 temporaries to ~4 MB whatever the tensor
# (a 4096 x 11008 projection at once would need ~700 MB of scratch next to a 4-bit model).
NF4_CHUNK = 1 << 18  # a multiple of the block and even, so chunks split neither blocks nor bytes


def nf4_quantize_chunk(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of a flat fp32 run -> (packed codes, absmax per block)."""
    absmax = blockwise_absmax(flat, NF4_BLOCK)
    # Multiply by the reciprocal, as bitsandbytes does: dividing rounds differently at ties.
    inverse = 1.0 / absmax.clamp(min=1e-38)
    scaled = (flat * expand_blocks(inverse, NF4_BLOCK, flat.numel())).clamp_(-1, 1)
    if scaled.numel() % 2:  # an odd count pads with a 0.0 weight (code 7), as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    return pack_nibbles(nearest_code(scaled, nf4_code(flat.device))), absmax


def nf4_quantize(weight: torch.Tensor, double_quant: bool = False) -> NF4Weight:
    flat = weight.reshape(-1)
    parts = [nf4_quantize_chunk(flat[i : i + NF4_CHUNK].float()) for i in range(0, flat.numel(), NF4_CHUNK)]
    packed = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
    absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
    nf4 = NF4Weight(packed, absmax, tuple(weight.shape))
    return double_quantize(nf4) if double_quant else nf4


LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer: grid points on [-1, 1] before the code lookup


@functools.cache
def dynamic_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """Grid point i (value -1 + 2i / 65535) -> index of the nearest dynamic-map code, ties to the lower."""
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=device)
    return nearest_code(-1.0 + (2.0 * i) / (LUT_SIZE - 1), dynamic_map(device))


def dynamic_codes(centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 dynamic-map codes of centred / scale, computed as bitsandbytes' CPU kernel does.

    It multiplies by the reciprocal, rounds the result to the 65536-point grid ((v + 1) * 0.5 * 65535
    + 0.5, truncated, in fp32) and looks the grid point up, so a value within half a grid step
    (1 / 65535) of a midpoint can get the code on the other side of it; a block whose scale is 0
    stores code 0. Exact nearest-code rounding disagreed with bitsandbytes 0.50.2 on 846 of 472k
    absmaxes (300 random tensors); this sequence matched all of them.
    """
    empty = scale == 0  # 0 * (1 / 0) would be NaN, and NaN has no grid index
    inverse = expand_blocks(torch.where(empty, 0.0, 1.0 / scale), ABSMAX_BLOCK, centred.numel())
    scaled = (centred * inverse).clamp(-1, 1)
    grid = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).long()  # non-negative, so long() truncates
    codes = dynamic_lut(centred.device)[grid]
    return torch.where(expand_blocks(empty, ABSMAX_BLOCK, centred.numel()), 0, codes).to(torch.uint8)


def double_quantize(w: NF4Weight) -> NF4Weight:
    offset = w.absmax.mean()
    centred = w.absmax - offset
    scale = blockwise_absmax(centred, ABSMAX_BLOCK)
    codes = dynamic_codes(centred, scale)
    return NF4Weight(w.packed, codes, w.shape, absmax_scale=scale, absmax_offset=offset)


def nf4_absmax(w: NF4Weight) -> torch.Tensor:
    """fp32 absmax per block of 64, undoing double quantization when present."""
    if not w.double_quant:
        return w.absmax
    values = dynamic_map(w.absmax.device)[w.absmax.long()]
    return values * expand_blocks(w.absmax_scale, ABSMAX_BLOCK, values.numel()) + w.absmax_offset


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = 1
    for d in w.shape:
        n *= d
    values = decode_bytes(w.packed, NF4_CODE)[:n]
    absmax, full = nf4_absmax(w), n - n % NF4_BLOCK
    out = torch.empty_like(values)
    torch.mul(values[:full].view(-1, NF4_BLOCK), absmax[: full // NF4_BLOCK, None], out=out[:full].view(-1, NF4_BLOCK))
    torch.mul(values[full:], absmax[-1], out=out[full:])  # a short last block, if any
    return out.view(w.shape).to(dtype)


@dataclass
class Int4Weight:
    packed: torch.Tensor  # (N, K / 2) uint8
    scale: torch.Tensor  # (N, K / group_size) fp32
    zero: torch.Tensor  # (N, K / group_size) fp32 holding integers (may fall outside 0..15)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def check_groups(K: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    if K % group_size:
        divisors = [g for g in (32, 64, 128) if K % g == 0]
        hint = f"; group sizes that divide it: {divisors}" if divisors else "; no standard group size divides it"
        raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}{hint}")


def int4_quantize(weight: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """weight (N, K) -> packed codes, per-group scale and zero point (module docstring has the formula)."""
    N, K = weight.shape
    check_groups(K, group_size)
    groups = weight.float().view(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (hi - lo) / 15
    # A constant group has no range: scale |c| / 15 with zero -15 (c > 0) or 15 (c < 0) stores c exactly.
    flat_group = scale == 0
    scale = torch.where(flat_group, (hi.abs() / 15).clamp(min=1e-30), scale)
    zero = torch.round(-lo / scale)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return Int4Weight(pack_nibbles(q.view(N, K)), scale, zero, group_size)


def int4_dequantize(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    N, K = w.shape
    q = decode_bytes(w.packed, tuple(float(i) for i in range(16))).view(N, K // w.group_size, w.group_size)
    return ((q - w.zero[..., None]) * w.scale[..., None]).view(N, K).to(dtype)


@dataclass
class Int8Weight:
    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def int8_quantize(weight: torch.Tensor) -> Int8Weight:
    absmax = weight.float().abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def int8_dequantize(w: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w.q.float() * w.scale[:, None]).to(dtype)
