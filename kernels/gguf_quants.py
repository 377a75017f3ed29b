"""Dequantization of llama.cpp's GGUF tensor types in plain torch, bit for bit equal to the `gguf`
package's numpy reference (gguf/quants.py, itself a port of ggml-quants.c).

A GGUF tensor is a run of rows; a row of ne[0] weights is ne[0] / block_size blocks laid end to end,
so the whole tensor is just an array of blocks. Block layouts (little-endian; fp16 = IEEE half):

    type  weights bytes  fields in order                                         weight
    F32        1     4   float32
    F16        1     2   float16
    BF16       1     2   bfloat16
    Q8_0      32    34   d fp16 | qs 32 x int8                                   qs * d
    Q4_0      32    18   d fp16 | qs 16 B of nibbles                             d * (q - 8)
    Q4_1      32    20   d fp16 | m fp16 | qs 16 B                               d * q + m
    Q5_0      32    22   d fp16 | qh 4 B (bit i: 5th bit of weight i) | qs 16 B  d * (q - 16)
    Q5_1      32    24   d fp16 | m fp16 | qh 4 B | qs 16 B                      d * q + m
    Q4_K     256   144   d fp16 | dmin fp16 | scales 12 B | qs 128 B             (d * sc) * q - dmin * mn
    Q5_K     256   176   d fp16 | dmin fp16 | scales 12 B | qh 32 B | qs 128 B   as Q4_K, 5-bit q
    Q6_K     256   210   ql 128 B nibbles | qh 64 B 2-bit pairs | scales 16 x int8 | d fp16
                                                                                 (d * sc) * (q - 32)

scales 12 B: eight 6-bit sub-block scales sc and eight 6-bit mins mn (see _scales_mins).

Nibble order: in the 32-weight types, weight j < 16 is the low nibble of qs[j] and weight j + 16 its
high nibble. Q4_K / Q5_K have 8 sub-blocks of 32 weights, each 32-byte stretch of qs holding two of
them (low nibbles, then high); Q6_K has 16 sub-blocks of 16 weights, one int8 scale each. The exact
bit arrangements (qh bits, 6-bit scales) are spelled out beside the code that unpacks them.

Bit-exactness: the integer codes and fp16 scales convert to float32 exactly, and every float32
multiply / add / subtract here is the one the reference does, in its order, so each result rounds
the same. fp16 words go through `_f16_to_f32`, which keeps NaN payloads as numpy does.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

__all__ = ["BlockFormat", "FORMATS", "format_of", "row_bytes", "dequantize"]


@dataclass(frozen=True)
class BlockFormat:
    """One GGML tensor type: `block_size` weights stored in `type_size` bytes."""

    name: str
    ggml_type: int
    block_size: int  # weights per block
    type_size: int  # bytes per block


FORMATS: dict[int, BlockFormat] = {
    f.ggml_type: f
    for f in (
        BlockFormat("F32", 0, 1, 4),
        BlockFormat("F16", 1, 1, 2),
        BlockFormat("Q4_0", 2, 32, 18),
        BlockFormat("Q4_1", 3, 32, 20),
        BlockFormat("Q5_0", 6, 32, 22),
        BlockFormat("Q5_1", 7, 32, 24),
        BlockFormat("Q8_0", 8, 32, 34),
        BlockFormat("Q4_K", 12, 256, 144),
        BlockFormat("Q5_K", 13, 256, 176),
        BlockFormat("Q6_K", 14, 256, 210),
        BlockFormat("BF16", 30, 1, 2),
    )
}

# Weights dequantized per step: bounds the uint8 / per-block temporaries to a few MB whatever the
# tensor's size (a 49152 x 576 embedding is 28 M weights), and a step this big keeps the per-op
# Python overhead (~ 5 us) well under 1 % of the work.
_CHUNK_WEIGHTS = 1 << 20


def format_of(ggml_type: int) -> BlockFormat:
    """The block format of a GGML type id; ValueError naming the supported types for any other id."""
    try:
        return FORMATS[int(ggml_type)]
    except KeyError:
        supported = ", ".join(f"{f.name} ({t})" for t, f in FORMATS.items())
        raise ValueError(f"unsupported GGML tensor type id {ggml_type}; supported: {supported}") from None


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of `n` weights of the type; ValueError if `n` is not a whole number of blocks."""
    fmt = format_of(ggml_type)
    if n % fmt.block_size:
        raise ValueError(
            f"a {fmt.name} row of {n} weights is not a whole number of {fmt.block_size}-weight blocks; "
            f"the row length (GGUF ne[0], the last torch dim) must be a multiple of {fmt.block_size}"
        )
    return n // fmt.block_size * fmt.type_size


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """Float32 weights of `shape` from `raw`, the tensor's bytes exactly as stored in the GGUF file.

    raw: 1-D uint8 (may be a read-only zero-copy view of an mmap: it is only read). shape: torch order,
    the last dim is GGUF's ne[0]. The result is new memory, never a view of `raw`, even for F32.
    """
    fmt = format_of(ggml_type)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative dim")
    n, ne0 = prod(shape), shape[-1] if shape else 1
    expected = row_bytes(ggml_type, ne0) * (n // ne0) if ne0 else 0
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw must be a 1-D uint8 tensor of the file's bytes, got {raw.dtype} of shape "
                         f"{tuple(raw.shape)}")
    if raw.numel() != expected:
        raise ValueError(f"a {fmt.name} tensor of shape {shape} takes {expected} bytes, got {raw.numel()} bytes")
    raw = raw.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=raw.device)
    kernel = _KERNELS[fmt.ggml_type]
    n_blocks, step = n // fmt.block_size, max(1, _CHUNK_WEIGHTS // fmt.block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        blocks = raw[start * fmt.type_size : stop * fmt.type_size].view(stop - start, fmt.type_size)
        if blocks.storage_offset() % 8:  # the kernels view bytes as wider words, which torch allows only
            blocks = blocks.clone()  # at an aligned storage offset (raw sliced at an odd byte); one chunk
        kernel(blocks, out[start * fmt.block_size : stop * fmt.block_size].view(stop - start, fmt.block_size))
    return out.view(shape)


# --- shared pieces --------------------------------------------------------------------------------
# The bit twiddling runs on int64 words, 8 codes per element: a mask or shift by the same amount in
# every byte lane is the same on a word as on its bytes (bits crossing a lane are masked off), and it
# makes the unpacking ~3x faster than on uint8 elements.

_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F


def _as_words(packed: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """packed (..., k) bytes as (..., k / itemsize) `dtype` words; copied first where torch does not
    allow the view (storage offset or row strides not a multiple of the word: 18, 20, 22, 210-byte blocks)."""
    size = dtype.itemsize
    if packed.storage_offset() % size or any(s % size for s in packed.stride()[:-1]) or packed.stride(-1) != 1:
        packed = packed.clone(memory_format=torch.contiguous_format)
    return packed.view(dtype)


def _nibbles(packed: Tensor) -> Tensor:
    """(..., k) bytes -> (..., 2, k) uint8: [..., 0, :] the low nibbles, [..., 1, :] the high ones."""
    k = packed.shape[-1]
    q = torch.empty((*packed.shape[:-1], 2, k), dtype=torch.uint8, device=packed.device)
    # 2-D operands (runs of k bytes): torch loops over them ~2x faster than over a 3-D view of the blocks
    words = _as_words(packed.reshape(-1, k))  # (runs, k / 8)
    q_words = q.view(-1, 2, k).view(torch.int64)  # (runs, 2, k / 8)
    torch.bitwise_and(words, _LOW_NIBBLES, out=q_words[:, 0])
    torch.bitwise_right_shift(words, 4, out=q_words[:, 1])
    q_words[:, 1] &= _LOW_NIBBLES  # also clears the sign bits the arithmetic shift brought in
    return q


def _bit_planes(words: Tensor, shifts: list[int], mask: int) -> Tensor:
    """(..., k) int64 -> (..., len(shifts), k): per byte lane, (byte >> shift) & mask, moved to bit 4
    (the bits above a K-quant's low nibble)."""
    shift = torch.tensor(shifts, dtype=torch.int64, device=words.device).view(-1, 1)
    return ((words.unsqueeze(-2) >> shift) & mask) << 4


@functools.cache
def _bit_spread(device: torch.device) -> Tensor:
    """(256,) int64: byte b -> 8 bytes, byte i = 0x10 if bit i of b is set (Q5_0 / Q5_1's qh)."""
    bits = (torch.arange(256).view(256, 1) >> torch.arange(8)) & 1  # (256, 8)
    return (bits << 4).to(torch.uint8).view(torch.int64).view(256).to(device)  # byte table viewed: endian-free


def _f16_to_f32(words: Tensor, out: Tensor) -> None:
    """out = float32 of the fp16 bit patterns `words` (int16). torch turns every fp16 NaN into
    0x7fffffff; numpy (the reference) keeps sign and payload (mantissa << 13), so NaNs are redone."""
    out.copy_(words.view(torch.float16))
    if out.numel() and torch.isnan(out.max()):  # max propagates NaN; far cheaper than isnan(out).any()
        nan = torch.isnan(out)
        h = words[nan].to(torch.int32)  # sign-extended: bit 31 set iff the fp16 sign bit is
        out.view(torch.int32)[nan] = (h & -0x80000000) | 0x7F800000 | ((h & 0x3FF) << 13)


def _f16_field(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 field at (even) byte `offset` of every block, as float32 (n_blocks, 1). One field at a
    time: torch's strided fp16 -> fp32 copy of (n_blocks, 2) is ~25x slower than two of (n_blocks, 1)."""
    words = blocks.view(torch.int16)[:, offset // 2 : offset // 2 + 1]  # every block is 2k bytes
    out = torch.empty(words.shape, dtype=torch.float32, device=blocks.device)
    _f16_to_f32(words, out)
    return out


# --- float types: one weight per "block" ----------------------------------------------------------


def _f32(blocks: Tensor, out: Tensor) -> None:
    out.view(torch.int32).copy_(blocks.view(torch.int32))  # bit copy: NaN payloads survive


def _f16(blocks: Tensor, out: Tensor) -> None:
    _f16_to_f32(blocks.view(torch.int16), out)


def _bf16(blocks: Tensor, out: Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))  # bf16 -> f32 is a 16-bit shift in torch, as in the reference


# --- 32-weight types ------------------------------------------------------------------------------


def _q8_0(blocks: Tensor, out: Tensor) -> None:
    d = _f16_field(blocks, 0)  # (n_blocks, 1)
    out.copy_(blocks[:, 2:].view(torch.int8))  # (n_blocks, 32)
    out.mul_(d)


def _q4_0(blocks: Tensor, out: Tensor) -> None:
    n_blocks = blocks.shape[0]
    d = _f16_field(blocks, 0)
    out.copy_(_nibbles(blocks[:, 2:]).view(n_blocks, 32))
    out.sub_(8)  # q - 8 is exact in float32, equal to the reference's int8 subtraction
    out.mul_(d)


def _q4_1(blocks: Tensor, out: Tensor) -> None:
    n_blocks = blocks.shape[0]
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n_blocks, 1) each
    out.copy_(_nibbles(blocks[:, 4:]).view(n_blocks, 32))
    out.mul_(d)  # (d * q) + m: two roundings, as the reference (not one fused multiply-add)
    out.add_(m)


def _five_bit(qh: Tensor, qs: Tensor) -> Tensor:
    """Q5_0 / Q5_1 codes (n_blocks, 32) uint8: the nibbles of qs (n_blocks, 16) | bit i of the
    little-endian uint32 qh (n_blocks, 4) << 4; bit i of that uint32 is bit i % 8 of byte i // 8."""
    q = _nibbles(qs).view(qs.shape[0], 32)
    index = qh.contiguous().view(-1).to(torch.int32)  # (n_blocks * 4,); contiguous first: ~2x faster
    q.view(torch.int64).view(-1).bitwise_or_(_bit_spread(qh.device).index_select(0, index))
    return q


def _q5_0(blocks: Tensor, out: Tensor) -> None:
    d = _f16_field(blocks, 0)
    out.copy_(_five_bit(blocks[:, 2:6], blocks[:, 6:]))
    out.sub_(16)
    out.mul_(d)


def _q5_1(blocks: Tensor, out: Tensor) -> None:
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n_blocks, 1) each
    out.copy_(_five_bit(blocks[:, 4:8], blocks[:, 8:]))
    out.mul_(d)
    out.add_(m)


# --- K-quants: 256-weight super-blocks ------------------------------------------------------------


def _scales_mins(packed: Tensor) -> Tensor:
    """Q4_K / Q5_K's 12 scale bytes (n_blocks, 12) -> (n_blocks, 2, 8) uint8: the 6-bit scales, the mins.

    Bytes as three rows of four (upper case: scale bits, lower case: min bits; A..H sub-blocks 0..7):
        0-3   EEAAAAAA .. HHDDDDDD   scales 0-3, top 2 bits of scales 4-7
        4-7   eeaaaaaa .. hhdddddd   mins 0-3, top 2 bits of mins 4-7
        8-11  eeeeEEEE .. hhhhHHHH   low 4 bits of scales (low nibble) and mins (high nibble) 4-7
    Each row is one int32 word, so every byte lane is unpacked at once (masks repeat per byte).
    """
    sc, mn, low = _as_words(packed, torch.int32).unbind(-1)  # (n_blocks,) each
    sc_high = (low & 0x0F0F0F0F) | ((sc >> 2) & 0x30303030)  # scales 4-7
    mn_high = ((low >> 4) & 0x0F0F0F0F) | ((mn >> 2) & 0x30303030)  # mins 4-7; masks drop the sign fill
    words = torch.stack([sc & 0x3F3F3F3F, sc_high, mn & 0x3F3F3F3F, mn_high], dim=-1)  # (n_blocks, 4)
    return words.view(torch.uint8).view(-1, 2, 8)


def _k_scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K's per-sub-block scale d * sc and offset dmin * mn, each (n_blocks, 8, 1)."""
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)  # (n_blocks, 1)
    sc, mn = _scales_mins(blocks[:, 4:16]).float().unbind(1)  # (n_blocks, 8) each
    # new contiguous products: the big broadcast multiply runs ~2.5x slower on a strided operand
    return (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)


def _q4_k(blocks: Tensor, out: Tensor) -> None:
    n_blocks = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    # qs: 4 stretches of 32 bytes; stretch c's low nibbles are sub-block 2c, its high ones 2c + 1
    q = _nibbles(blocks[:, 16:].reshape(n_blocks, 4, 32))  # (n_blocks, 4, 2, 32)
    o = out.view(n_blocks, 8, 32)
    o.copy_(q.view(n_blocks, 8, 32))
    o.mul_(scale)
    o.sub_(offset)


def _q5_k(blocks: Tensor, out: Tensor) -> None:
    n_blocks = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    q = _nibbles(blocks[:, 48:].reshape(n_blocks, 4, 32)).view(n_blocks, 8, 32)
    # qh (32 bytes): bit g of byte j is the 5th bit of weight j of sub-block g
    high = _bit_planes(_as_words(blocks[:, 16:48]), list(range(8)), 0x0101010101010101)  # (n_blocks, 8, 4)
    q.view(torch.int64).bitwise_or_(high)
    o = out.view(n_blocks, 8, 32)
    o.copy_(q)
    o.mul_(scale)
    o.sub_(offset)


def _q6_k(blocks: Tensor, out: Tensor) -> None:
    n_blocks = blocks.shape[0]
    d = _f16_field(blocks, 208)  # (n_blocks, 1)
    scale = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # (n_blocks, 16, 1)
    # Two halves of 128 weights. Half h: ql bytes 64h..64h+63 give weights 0-63 (low nibbles) and
    # 64-127 (high nibbles); qh bytes 32h..32h+31 give the top 2 bits, bits 2k..2k+1 of byte j for
    # weight 32k + j.
    q = _nibbles(blocks[:, :128].reshape(n_blocks, 2, 64))  # (n_blocks, 2, 2, 64)
    qh = _as_words(blocks[:, 128:192].reshape(n_blocks, 2, 32))  # (n_blocks, 2, 4)
    high = _bit_planes(qh, [0, 2, 4, 6], 0x0303030303030303)  # (n_blocks, 2, 4, 4): 4 x 32 bytes per half
    q.view(n_blocks, 2, 4, 32).view(torch.int64).bitwise_or_(high)
    o = out.view(n_blocks, 16, 16)
    o.copy_(q.view(n_blocks, 16, 16))
    o.sub_(32)
    o.mul_(scale)


_KERNELS: dict[int, Callable[[Tensor, Tensor], None]] = {
    0: _f32, 1: _f16, 30: _bf16, 8: _q8_0, 2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}
