"""Triton kernels for y = x W^T and dX = dY W, W (N, K) a GGUF Q4_0 / Q4_1 / Q8_0 weight read as the file has it.

The counterpart of quant_matmul_kernels.py (NF4 / int4) for kernels.gguf_blocks.BlockWeight: the same
two kernels (a tiled forward GEMM with split-K for decode, and the transposed dX kernel), the same
autotune lists, launch arithmetic and LoRA epilogue (imported from there), and the same contract:
the launchers take already-checked 2-D operands of supported weights (supports()); forward_reference
and transposed_reference are the torch oracle, with the same signatures.

Weight layout (gguf_blocks.py is the spec), planes of llama.cpp's 32-weight blocks, row n, block b:
  d    float16 (N, K / 32), the block scale;  m  float16 (N, K / 32), Q4_1's block minimum
  qs   Q8_0: int8 (N, K), code of weight k at qs[n, k];  w = d * q
       Q4_0 / Q4_1: uint8 (N, K / 2), block b at bytes b * 16 .. b * 16 + 15; weight j < 16 of the
       block is the LOW nibble of byte b * 16 + j, weight j + 16 its HIGH nibble (not interleaved
       as NF4 / int4 are);  Q4_0: w = d * (q - 8),  Q4_1: w = d * q + m
A weight tile is BLOCK_K consecutive k (a power of two, >= 32, dividing K: whole blocks, no K masks)
of BLOCK_N rows, handled as (BLOCK_N, NB = BLOCK_K / 32 blocks, 32): its NB scales per row are
loaded once and broadcast over the block's last axis, no per-element scale index. Q4 bytes are
loaded as (BLOCK_N, NB, 16) (contiguous: 16 * NB bytes a row), split into nibbles with join, which
puts the (low, high) pair last, and permuted to (BLOCK_N, NB, 2, 16) so that reshaping to
(BLOCK_N, BLOCK_K) gives the block order: low nibbles are weights 0..15, high ones 16..31.

Exactness: dequantization is fp32, then a cast to x's dtype (round to nearest even) for tl.dot,
which accumulates in fp32 (fp32 operands: tf32 on NVIDIA GPUs). Every product d * code is exact in
fp32 (an fp16 d has 11 significant bits, a code at most 8), so d * q + m rounds once whether or not
the compiler contracts it into a fused multiply-add, and W equals gguf_blocks.dequantize(w, dtype)
bit for bit (the tests read it out with one-hot inputs).

Paths as in quant_matmul_kernels: M > SKINNY_M takes the tiled GEMM (grouped tile order); M <= 16
the same kernel with BLOCK_M = 16 and split-K (fp32 partial sums (SPLIT_K, M, N) added in torch);
the transposed kernel computes (BLOCK_M, BLOCK_K) tiles of dX, reducing over N with the same weight
tile untransposed. Both add an optional epilogue scale * L (M, r) @ R (r, out) and mask M and N.
"""
from __future__ import annotations

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import quant_matmul_kernels as qmm

# The jit helpers and the rules these kernels follow under the interpreter: _triton.py. Under
# TRITON_INTERPRET=1, quant_matmul_kernels must be (re)imported before this module (_lora_epilogue).
from ._triton import cast, dot, grouped_tile, is_hopper
from .gguf_blocks import BLOCK, Q4_0, Q4_1, Q8_0, BlockWeight, dequantize
from .quant_matmul_kernels import (
    AMPERE_SKINNY,
    AMPERE_T,
    AMPERE_TILED,
    HOPPER_SKINNY,
    HOPPER_T,
    HOPPER_TILED,
    _lora_epilogue,
    block_k_cap,
)

TYPES = (Q4_0, Q4_1, Q8_0)  # the QTYPE constexpr is the ggml type number


@triton.jit
def _weight_tile(qs_ptr, d_ptr, m_ptr, offs_n, n_mask, k0, K,
                 QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W[offs_n, k0:k0 + BLOCK_K] as a (BLOCK_N, BLOCK_K) tile, k0 % 32 == 0; rows past N come out 0."""
    NB: tl.constexpr = BLOCK_K // 32
    rows = offs_n.to(tl.int64)
    row_mask = n_mask[:, None]
    scale_at = rows[:, None] * (K // 32) + (k0 // 32 + tl.arange(0, NB))[None, :]  # (BLOCK_N, NB)
    d = tl.load(d_ptr + scale_at, mask=row_mask, other=0.0).to(tl.float32)
    if QTYPE == 8:  # Q8_0: int8 codes, (BLOCK_N, NB, 32)
        cols = k0 + tl.arange(0, NB)[:, None] * 32 + tl.arange(0, 32)[None, :]
        q = tl.load(qs_ptr + rows[:, None, None] * K + cols[None, :, :], mask=row_mask[:, :, None], other=0)
        w = tl.reshape(q.to(tl.float32) * d[:, :, None], (BLOCK_N, BLOCK_K))
    else:  # Q4_x: bytes (BLOCK_N, NB, 16) -> nibbles (BLOCK_N, NB, 2, 16), low half first (module docstring)
        cols = k0 // 2 + tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
        packed = tl.load(qs_ptr + rows[:, None, None] * (K // 2) + cols[None, :, :], mask=row_mask[:, :, None],
                         other=0)
        q = tl.permute(tl.join(packed & 0xF, packed >> 4), (0, 1, 3, 2)).to(tl.float32)
        if QTYPE == 2:  # Q4_0
            w = (q - 8.0) * d[:, :, None, None]
        else:  # Q4_1: d * q exact, so one rounding with or without contraction
            m = tl.load(m_ptr + scale_at, mask=row_mask, other=0.0).to(tl.float32)
            w = q * d[:, :, None, None] + m[:, :, None, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _gmm_kernel(x_ptr, qs_ptr, d_ptr, m_ptr, bias_ptr, l_ptr, r_ptr, out_ptr,
                M, N, K, k_per_split, M_BUCKET, stride_xm, stride_om, stride_split, R,
                stride_lm, stride_lr, stride_rr, stride_ro, lora_scale,
                QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
                INTERPRET_BF16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[split] = x[:, ks] @ W[:, ks]^T over split program_id(1)'s K range; split 0 adds bias + LoRA."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_mask[:, None], other=0.0)
        w = _weight_tile(qs_ptr, d_ptr, m_ptr, offs_n, n_mask, k0, K, QTYPE, BLOCK_N, BLOCK_K)
        acc = dot(x, tl.trans(cast(w, x.dtype, INTERPRET_BF16)), acc, INTERPRET_BF16)
    if pid_k == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            acc = _lora_epilogue(acc, l_ptr, r_ptr, offs_m, m_mask, offs_n, n_mask, R, stride_lm, stride_lr,
                                 stride_rr, stride_ro, lora_scale, R_PAD, INTERPRET_BF16)
    out = out_ptr + pid_k * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gmm_t_kernel(dy_ptr, qs_ptr, d_ptr, m_ptr, l_ptr, r_ptr, out_ptr,
                  M, N, K, M_BUCKET, stride_dm, stride_om, R, stride_lm, stride_lr, stride_rr, stride_ro, lora_scale,
                  QTYPE: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = dY @ W (+ scale * L @ R): tiles (BLOCK_M, BLOCK_K) of dX, reducing over N in BLOCK_N steps."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, K // BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dm
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = _weight_tile(qs_ptr, d_ptr, m_ptr, offs_n, n_mask, pid_k * BLOCK_K, K, QTYPE, BLOCK_N, BLOCK_K)
        acc = dot(dy, cast(w, dy.dtype, INTERPRET_BF16), acc, INTERPRET_BF16)
    if HAS_LORA:
        acc = _lora_epilogue(acc, l_ptr, r_ptr, offs_m, m_mask, offs_k, offs_k < K, R, stride_lm, stride_lr,
                             stride_rr, stride_ro, lora_scale, R_PAD, INTERPRET_BF16)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_mask[:, None])


# ---------------------------------------------------------------------------------------------
# Autotune: quant_matmul_kernels' lists (every BLOCK_K there is 32 or more). Compiled offline
# (sm_90 / sm_80, LoRA + bias, with the runtime's 16-divisibility of pointers, N, K and strides,
# cuobjdump) for every config and type, bf16 and fp32: no spills, at most 200 registers in bf16;
# the codes are staged in shared memory by cp.async, as x is (sm_80 IR). One config does not fit:
# HOPPER_T's 128 x 128 x 64 with fp32 inputs needs 232-240 KB of sm_90's 227 (NF4's: 234); the
# autotuner skips a config that raises OutOfResources. tests/kernels/test_gguf_matmul.py compiles
# the largest ones (slow).
# ---------------------------------------------------------------------------------------------
def _prune(hopper: list, ampere: list):
    """early_config_prune: this GPU's list, BLOCK_K lowered to block_k_cap(K, 32), duplicates dropped."""
    def prune(configs, named_args, **kwargs):
        keep = hopper if is_hopper() else ampere
        cap = block_k_cap(named_args["K"], BLOCK)
        seen, out = set(), []
        for c in configs:
            kw = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], cap)}
            sig = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if c in keep and sig not in seen:
                seen.add(sig)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        return out
    return {"early_config_prune": prune}


def _tuned(kernel, hopper: list, ampere: list):
    keys = ["N", "K", "M_BUCKET", "QTYPE", "HAS_LORA"]
    return triton.autotune(hopper + ampere, key=keys, prune_configs_by=_prune(hopper, ampere))(kernel)


_gmm_tiled = _tuned(_gmm_kernel, HOPPER_TILED, AMPERE_TILED)
_gmm_skinny = _tuned(_gmm_kernel, HOPPER_SKINNY, AMPERE_SKINNY)
_gmm_t = _tuned(_gmm_t_kernel, HOPPER_T, AMPERE_T)

# The interpreter runs every program in Python: one small config. BLOCK_K 64 (two blocks a tile)
# where K allows it, 32 (one) otherwise, so the tests cover both tile shapes.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2)


def supports(w: BlockWeight) -> bool:
    """Q4_0 / Q4_1 / Q8_0 (the planar types) with K % 32 == 0, so the largest power-of-two BLOCK_K
    dividing K is >= 32 (whole blocks per tile; tl.dot needs 16), and N >= 1 (nothing to launch
    otherwise). K % 32 == 0 holds for every such weight from_gguf_bytes builds."""
    N, K = w.shape
    return w.ggml_type in TYPES and K > 0 and K % BLOCK == 0 and N >= 1


# ---------------------------------------------------------------------------------------------
# Launchers: checked 2-D operands on one device (the caller checks them).
# ---------------------------------------------------------------------------------------------
def weight_args(w: BlockWeight) -> tuple[list[Tensor], dict]:
    """Pointer args (qs, d, m), contiguous, and the QTYPE constexpr; Q4_0 / Q8_0 pass d in m's unused slot."""
    d = w.d.contiguous()
    return [w.qs.contiguous(), d, d if w.m is None else w.m.contiguous()], dict(QTYPE=w.ggml_type)


def forward(x2: Tensor, w: BlockWeight, bias: Tensor | None, lora_left: Tensor | None,
            lora_right_t: Tensor | None, scale: float) -> Tensor:
    """x2 (M, K), unit stride along K -> x2 W^T + bias + scale * lora_left @ lora_right_t: (M, N) in x2.dtype.

    lora_left (M, r) = (LoRA input) A^T and lora_right_t (r, N) = B^T, any strides. The launch (split-K
    for M <= SKINNY_M) is quant_matmul_kernels', shared with the NF4 / int4 kernels."""
    w_tensors, fmt = weight_args(w)
    return qmm.launch_forward((_gmm_skinny, _gmm_tiled), x2, w_tensors, fmt, BLOCK, w.shape[0], bias, lora_left,
                              lora_right_t, scale)


def transposed(dy: Tensor, w: BlockWeight, lora_left: Tensor | None, lora_right: Tensor | None,
               scale: float) -> Tensor:
    """dy (M, N), unit stride along N -> dy @ W + scale * lora_left @ lora_right: (M, K) in dy.dtype.

    lora_left (M, r) = dY B and lora_right (r, K) = A, any strides."""
    w_tensors, fmt = weight_args(w)
    return qmm.launch_transposed(_gmm_t, dy, w_tensors, fmt, BLOCK, w.shape[1], lora_left, lora_right, scale)


# ---------------------------------------------------------------------------------------------
# Torch reference (the oracle): the dense weight from gguf_blocks.dequantize, then plain matmuls.
# ---------------------------------------------------------------------------------------------
def forward_reference(x2: Tensor, w: BlockWeight, bias: Tensor | None, lora_left: Tensor | None,
                      lora_right_t: Tensor | None, scale: float) -> Tensor:
    """forward's math in torch, in x2.dtype (bias must have it)."""
    y = F.linear(x2, dequantize(w, x2.dtype), bias)
    return y if lora_left is None else y + scale * (lora_left @ lora_right_t)


def transposed_reference(dy: Tensor, w: BlockWeight, lora_left: Tensor | None, lora_right: Tensor | None,
                         scale: float) -> Tensor:
    """transposed's math in torch, in dy.dtype."""
    dx = dy @ dequantize(w, dy.dtype)
    return dx if lora_left is None else dx + scale * (lora_left @ lora_right)
