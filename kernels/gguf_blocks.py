"""GGUF block-quantized weights kept as the user's file has them: the QLoRA base for quantize="keep".

A `BlockWeight` holds a linear's (N, K) weight in one of llama.cpp's block formats, with no
re-quantization: LoRA then trains against exactly the weights llama.cpp / ollama run (re-quantizing
SmolLM2-135M's Q4_1 file to NF4 moves its logits by 37%, relative Frobenius). Q8_0 / Q4_0 / Q4_1 are
split into planes, losslessly, so the GEMM kernels and the CPU path read aligned arrays:

    qs  Q8_0: int8 (N, K) codes; Q4_0 / Q4_1: uint8 (N, K // 2), each 16-byte run of a block as in
        the file (weight j < 16 of a block is the low nibble of byte j, weight j + 16 its high nibble)
    d   float16 (N, K // 32): the block scales
    m   float16 (N, K // 32): Q4_1's block minimums (None otherwise)

Other types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) keep the file's raw blocks in `qs` (uint8 (N, row bytes))
and dequantize through kernels.gguf_quants; they have no kernel. Every path computes the weights
`gguf.quants.dequantize` gives, bit for bit, in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gguf_quants import dequantize as dequantize_raw
from .gguf_quants import format_of, row_bytes

Q4_0, Q4_1, Q8_0 = 2, 3, 8
PLANAR = {Q4_0: "q4_0", Q4_1: "q4_1", Q8_0: "q8_0"}  # ggml type -> QuantLinear method name
KEPT = {**PLANAR, 6: "q5_0", 7: "q5_1", 12: "q4_k", 13: "q5_k", 14: "q6_k"}
BLOCK = 32  # weights per block of the planar types


@dataclass(frozen=True)
class BlockWeight:
    qs: Tensor
    d: Tensor | None
    m: Tensor | None
    ggml_type: int
    shape: tuple[int, int]  # (N, K)

    @property
    def packed(self) -> Tensor:
        """The codes: what kernels.dispatch.use_triton looks at for the device."""
        return self.qs

    @property
    def planar(self) -> bool:
        return self.ggml_type in PLANAR


def from_gguf_bytes(raw: Tensor, ggml_type: int, shape: tuple[int, int]) -> BlockWeight:
    """A (N, K) tensor's file bytes (1-D uint8, e.g. a view of the mmap) -> BlockWeight (new memory)."""
    N, K = shape
    if ggml_type not in KEPT:
        raise ValueError(f"quantize='keep' keeps {', '.join(sorted(KEPT.values()))} blocks; "
                         f"this tensor is {format_of(ggml_type).name}")
    expected = row_bytes(ggml_type, K) * N
    if raw.numel() != expected:
        raise ValueError(f"a {format_of(ggml_type).name} ({N}, {K}) weight takes {expected} bytes, got {raw.numel()}")
    blocks = raw.reshape(N * K // format_of(ggml_type).block_size, format_of(ggml_type).type_size)
    if ggml_type not in PLANAR:
        return BlockWeight(raw.reshape(N, -1).clone(), None, None, ggml_type, (N, K))
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(N, K // BLOCK)
    if ggml_type == Q8_0:
        return BlockWeight(blocks[:, 2:].contiguous().view(torch.int8).reshape(N, K), d, None, ggml_type, (N, K))
    if ggml_type == Q4_0:
        return BlockWeight(blocks[:, 2:].contiguous().reshape(N, K // 2), d, None, ggml_type, (N, K))
    m = blocks[:, 2:4].contiguous().view(torch.float16).reshape(N, K // BLOCK)
    return BlockWeight(blocks[:, 4:].contiguous().reshape(N, K // 2), d, m, ggml_type, (N, K))


def codes(w: BlockWeight) -> Tensor:
    """Planar types: the integer code of every weight as float32 (N, K // 32, 32), exact."""
    N, K = w.shape
    if w.ggml_type == Q8_0:
        return w.qs.view(N, K // BLOCK, BLOCK).float()
    packed = w.qs.view(N, K // BLOCK, BLOCK // 2)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # low nibbles are weights 0..15
    return q - 8 if w.ggml_type == Q4_0 else q


def dequantize(w: BlockWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense (N, K) weight. float32 first, in the reference's order (d * q, then + m: two roundings,
    not a fused multiply-add), so the values equal gguf.quants.dequantize's before the cast to dtype."""
    N, K = w.shape
    if not w.planar:
        return dequantize_raw(w.qs.reshape(-1), w.ggml_type, (N, K)).to(dtype)
    out = codes(w).mul_(w.d.float()[..., None])
    if w.m is not None:
        out.add_(w.m.float()[..., None])
    return out.view(N, K).to(dtype)
