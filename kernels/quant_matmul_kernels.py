"""Triton kernels for y = x W'^T and dX = dY W', W' (N, K) dequantized on the fly from NF4 / int4.

The checked entry point, the torch reference and the autograd.Function live in quant_matmul.py;
this module holds the @triton.jit code, the autotune configs and the raw launchers, which take
already-checked 2-D operands of supported weights (supports()).

Weight layout (kernels/quant.py is the spec; both formats pack two 4-bit codes per byte, the
element with the even index in the HIGH nibble):
  NF4   packed: the row-major flattened weight, row n from byte n * K / 2; absmax: one fp32 per 64
        consecutive weights, so with K % 64 == 0 (required here) row n, block j is n * K / 64 + j.
        Double quantization: absmax = dmap[code] * scale2[index // 256] + offset, computed here
        per (row, block) from the uint8 codes, not dequantized up front (4 bytes of fp32 absmax
        per 64 weights add 1/8 to the bytes a decode step reads; the codes add 1/32).
  int4  packed (N, K / 2); scale and zero (N, K / G): w' = (q - zero) * scale.
A weight tile is BLOCK_K consecutive k of BLOCK_N rows: its packed bytes are read once, as
(BLOCK_N, BLOCK_K / 2), and split into nibbles with join + reshape (tl.interleave's recipe); its
scales once per (row, group), broadcast over the group. NF4 code values come from a select tree,
not a gather (_nf4_values). Dequantization is fp32 in the spec's order (code * absmax,
(q - zero) * scale), then cast to x's dtype (round to nearest even, as torch's .to()), so W'
equals the spec's dequantize(dtype) bit for bit; the tests read it out with one-hot inputs.
Accumulation is fp32 (tl.dot; fp32 operands are tf32 on NVIDIA GPUs). No mask along K: BLOCK_K
is a power of two dividing K (block_k_cap).

Paths: the tiled GEMM (BLOCK_M x BLOCK_N x BLOCK_K, grouped tile order for L2 reuse) for
M > SKINNY_M, and for decode (M <= 16) the same kernel with BLOCK_M = 16 and split-K: each
program owns one N tile and one K range, so each weight byte is read once, and the partial sums
(SPLIT_K, M, N) are added in torch (deterministic, unlike atomics; M <= 16 keeps them tiny).
The transposed kernel computes dX tiles (BLOCK_M, BLOCK_K), reducing over N with the same
weight tile, untransposed. Both take an optional LoRA epilogue: + scale * L (M, r) @ R (r, out).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# dot, cast (INTERPRET_BF16: the interpreter's bf16 faults), grouped_tile and the rules these
# kernels follow under the interpreter: _triton.py
from ._triton import DOT_MIN, cast, dot, grouped_tile, interpret_bf16, is_hopper, m_bucket, r_pad, tile_grid
from .dispatch import interpreting
from .quant import NF4_CODE, NF4Weight, dynamic_map

NF4, INT4 = 0, 1  # FORMAT constexpr values
SKINNY_M = 16  # decode: one BLOCK_M = 16 tile (the smallest tl.dot M) covers the batch
MAX_SPLIT_K = 16


NF4_VALUES = tl.constexpr(NF4_CODE)


@triton.jit
def _nf4_values(q):
    """NF4 code (int32, 0..15) -> fp32 code value, as a select tree on the code's four bits.

    Selects, not a gather from a 16-entry table: Triton pipelines a gather like any load, staging
    a (BLOCK_N, BLOCK_K) buffer per stage in shared memory. A first version that gathered code
    values and absmaxes per element compiled (offline, sm_90, 128x128x64, 3 stages) to 224 KB of
    the 227 KB; with the select tree and per-(row, block) scales, 34 KB. Cost: 15 selects a weight.
    """
    b0 = (q & 1) != 0
    p0 = tl.where(b0, NF4_VALUES[1], NF4_VALUES[0])
    p1 = tl.where(b0, NF4_VALUES[3], NF4_VALUES[2])
    p2 = tl.where(b0, NF4_VALUES[5], NF4_VALUES[4])
    p3 = tl.where(b0, NF4_VALUES[7], NF4_VALUES[6])
    p4 = tl.where(b0, NF4_VALUES[9], NF4_VALUES[8])
    p5 = tl.where(b0, NF4_VALUES[11], NF4_VALUES[10])
    p6 = tl.where(b0, NF4_VALUES[13], NF4_VALUES[12])
    p7 = tl.where(b0, NF4_VALUES[15], NF4_VALUES[14])
    b1 = (q & 2) != 0
    r0, r1 = tl.where(b1, p1, p0), tl.where(b1, p3, p2)
    r2, r3 = tl.where(b1, p5, p4), tl.where(b1, p7, p6)
    b2 = (q & 4) != 0
    s0, s1 = tl.where(b2, r1, r0), tl.where(b2, r3, r2)
    return tl.where((q & 8) != 0, s1, s0)


@triton.jit
def _per_element(t, BLOCK_N: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr):
    """(BLOCK_N, NSUB) per-group values -> broadcastable to (BLOCK_N, NSUB * SUB) weights."""
    if NSUB == 1:
        out = t
    else:
        out = tl.reshape(tl.broadcast_to(t[:, :, None], (BLOCK_N, NSUB, SUB)), (BLOCK_N, NSUB * SUB))
    return out


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, o_ptr, dmap_ptr, offs_n, n_mask, k0, K,
                 FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W'[offs_n, k0:k0 + BLOCK_K] as a (BLOCK_N, BLOCK_K) tile; rows past N come out finite.

    GROUP is the block (NF4: 64, K % 64 == 0) or group size: the tile spans NSUB = BLOCK_K / SUB
    groups of SUB = min(BLOCK_K, GROUP) weights (the launcher keeps one a multiple of the other).
    """
    rows = offs_n.to(tl.int64)
    row_mask = n_mask[:, None]
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_ptr + rows[:, None] * (K // 2) + byte_cols[None, :], mask=row_mask, other=0)
    q = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K)).to(tl.int32)
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    NSUB: tl.constexpr = BLOCK_K // SUB
    groups = rows[:, None] * (K // GROUP) + (k0 // GROUP + tl.arange(0, NSUB))[None, :]  # (BLOCK_N, NSUB)
    if FORMAT == 0:  # NF4
        if DOUBLE_QUANT:  # absmax = dmap[code] * scale2[block // 256] + offset, as quant.nf4_absmax
            codes = tl.load(s_ptr + groups, mask=row_mask, other=0).to(tl.int32)
            absmax = tl.load(dmap_ptr + codes) * tl.load(z_ptr + groups // 256, mask=row_mask, other=0.0)
            absmax = absmax + tl.load(o_ptr)
        else:
            absmax = tl.load(s_ptr + groups, mask=row_mask, other=0.0)
        w = _nf4_values(q) * _per_element(absmax, BLOCK_N, NSUB, SUB)
    else:  # int4: w' = (q - zero) * scale
        scale = _per_element(tl.load(s_ptr + groups, mask=row_mask, other=0.0), BLOCK_N, NSUB, SUB)
        zero = _per_element(tl.load(z_ptr + groups, mask=row_mask, other=0.0), BLOCK_N, NSUB, SUB)
        w = (q.to(tl.float32) - zero) * scale
    return w


@triton.jit
def _lora_epilogue(acc, l_ptr, r_ptr, offs_m, m_mask, offs_o, o_mask, R, stride_lm, stride_lr,
                   stride_rr, stride_ro, lora_scale, R_PAD: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """acc + scale * L[offs_m, :R] @ Rt[:R, offs_o]: the (BLOCK_M, r) x (r, BLOCK_OUT) LoRA tile."""
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    left = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                   mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    right = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_o.to(tl.int64)[None, :] * stride_ro,
                    mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    lora = dot(left, right, tl.full(acc.shape, 0.0, tl.float32), INTERPRET_BF16)
    return acc + lora_scale * lora


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, o_ptr, dmap_ptr, bias_ptr, l_ptr, r_ptr, out_ptr,
                M, N, K, k_per_split, M_BUCKET, stride_xm, stride_om, stride_split, R,
                stride_lm, stride_lr, stride_rr, stride_ro, lora_scale,
                FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[split] = x[:, ks] @ W'[:, ks]^T over split program_id(1)'s K range; split 0 adds bias + LoRA."""
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
        w = _weight_tile(w_ptr, s_ptr, z_ptr, o_ptr, dmap_ptr, offs_n, n_mask, k0, K,
                         FORMAT, DOUBLE_QUANT, GROUP, BLOCK_N, BLOCK_K)
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
def _qmm_t_kernel(dy_ptr, w_ptr, s_ptr, z_ptr, o_ptr, dmap_ptr, l_ptr, r_ptr, out_ptr,
                  M, N, K, M_BUCKET, stride_dm, stride_om, R, stride_lm, stride_lr, stride_rr, stride_ro, lora_scale,
                  FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUP: tl.constexpr,
                  HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = dY @ W' (+ scale * L @ Rt): tiles (BLOCK_M, BLOCK_K) of dX, reducing over N in BLOCK_N steps.

    The weight tile is the same (BLOCK_N, BLOCK_K) tile the forward reads, used untransposed.
    """
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
        w = _weight_tile(w_ptr, s_ptr, z_ptr, o_ptr, dmap_ptr, offs_n, n_mask, pid_k * BLOCK_K, K,
                         FORMAT, DOUBLE_QUANT, GROUP, BLOCK_N, BLOCK_K)
        acc = dot(dy, cast(w, dy.dtype, INTERPRET_BF16), acc, INTERPRET_BF16)
    if HAS_LORA:
        acc = _lora_epilogue(acc, l_ptr, r_ptr, offs_m, m_mask, offs_k, offs_k < K, R, stride_lm, stride_lr,
                             stride_rr, stride_ro, lora_scale, R_PAD, INTERPRET_BF16)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_mask[:, None])


# ---------------------------------------------------------------------------------------------
# Autotune configs; BLOCK_K is lowered per call to block_k_cap (no K masks). The dequantized tile
# lives in registers beside the accumulator, so tiles are smaller than a plain GEMM's: every config
# here was compiled offline (triton.compile for sm_90 / sm_80, the worst case of NF4 double quant +
# LoRA + bias; cuobjdump) to 255 registers or fewer without spills in bf16 and within shared memory
# (sm_90: 227 KB; sm_80: 163 KB; sm_86: 99 KB) in fp32. 128x256 / 256x128 tiles and 128x128 with
# 4 warps spilled. The early prune keeps the list of the running GPU's architecture.
# ---------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps, num_stages=stages)


HOPPER_TILED = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(64, 128, 64, 8, 4),
                _cfg(128, 64, 64, 8, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 64, 4, 4)]
AMPERE_TILED = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3),
                _cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4)]
# Decode: BLOCK_M = 16 is the smallest tl.dot M; long K runs (up to 256 codes = 128 bytes a row)
# keep the weight stream in whole cache lines. Memory-bound: few warps, deep pipelines.
HOPPER_SKINNY = [_cfg(16, bn, bk, w, s, 1) for bn, bk, w, s in
                 [(64, 128, 4, 4), (128, 64, 4, 4), (32, 128, 2, 6), (256, 64, 8, 3), (128, 128, 8, 3),
                  (32, 256, 4, 4)]]
AMPERE_SKINNY = [_cfg(16, bn, bk, w, s, 1) for bn, bk, w, s in
                 [(32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (32, 256, 8, 3), (32, 64, 2, 5)]]
# dX tiles are (BLOCK_M, BLOCK_K), reducing over BLOCK_N.
HOPPER_T = [_cfg(128, 64, 128, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(64, 64, 128, 4, 4),
            _cfg(128, 64, 64, 8, 4), _cfg(64, 128, 64, 8, 4), _cfg(64, 64, 64, 4, 4)]
AMPERE_T = [_cfg(128, 32, 128, 8, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 32, 128, 4, 4),
            _cfg(128, 32, 64, 4, 3), _cfg(64, 64, 32, 4, 4), _cfg(64, 64, 64, 4, 4)]
MAX_BLOCK_K = 256  # the largest BLOCK_K in any list


def block_k_cap(K: int, group: int) -> int:
    """Largest usable BLOCK_K: a power of two (tl.arange) dividing K (no K masks), at most 256, and
    a divisor or multiple of the quantization group (whole groups per tile or tiles per group)."""
    cap = min(K & -K, MAX_BLOCK_K)
    if group & (group - 1):  # not a power of two: BLOCK_K must divide the group
        cap = min(cap, group & -group)
    return cap


def supports(qweight) -> bool:
    """NF4 with K % 64 == 0 (each 64-block inside one row); int4 with a BLOCK_K of at least 16 (tl.dot's minimum)."""
    K = qweight.shape[1]
    if isinstance(qweight, NF4Weight):
        return K % 64 == 0
    return block_k_cap(K, qweight.group_size) >= DOT_MIN


def _arch_prune(hopper: list, ampere: list):
    """early_config_prune: keep this GPU's list, lower BLOCK_K to block_k_cap, drop duplicates."""
    def prune(configs, named_args, **kwargs):
        keep = hopper if is_hopper() else ampere
        cap = block_k_cap(named_args["K"], kwargs["GROUP"])
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
    keys = ["N", "K", "M_BUCKET", "FORMAT", "GROUP", "HAS_LORA"]
    return triton.autotune(hopper + ampere, key=keys, prune_configs_by=_arch_prune(hopper, ampere))(kernel)


_qmm_tiled = _tuned(_qmm_kernel, HOPPER_TILED, AMPERE_TILED)
_qmm_skinny = _tuned(_qmm_kernel, HOPPER_SKINNY, AMPERE_SKINNY)
_qmm_t = _tuned(_qmm_t_kernel, HOPPER_T, AMPERE_T)

# The interpreter runs every program in Python: one small fixed config per kernel, chosen so the
# tests' shapes (M <= 17, N <= 48, K in {64, 128}) still span several tiles and K steps.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


# ---------------------------------------------------------------------------------------------
# Launchers: operands are checked 2-D tensors on one device (quant_matmul.py checks them).
# ---------------------------------------------------------------------------------------------
def weight_args(qweight) -> tuple[list[torch.Tensor], dict]:
    """Kernel pointer args (w, s, z, o, dmap), contiguous, and format constexprs; unused slots get the packed tensor."""
    packed = qweight.packed.contiguous()
    if isinstance(qweight, NF4Weight):
        dq = qweight.double_quant
        z = qweight.absmax_scale if dq else packed
        o = qweight.absmax_offset.reshape(1) if dq else packed
        dmap = dynamic_map(packed.device) if dq else packed
        tensors = [packed, qweight.absmax, z, o, dmap]
        meta = dict(FORMAT=NF4, DOUBLE_QUANT=dq, GROUP=64)
    else:
        tensors = [packed, qweight.scale, qweight.zero, packed, packed]
        meta = dict(FORMAT=INT4, DOUBLE_QUANT=False, GROUP=qweight.group_size)
    return [t.contiguous() for t in tensors], meta


def lora_args(left, right_t, scale) -> tuple[list[torch.Tensor | None], dict]:
    """Pointer args and constexprs for the epilogue L (M, r) @ Rt (r, out), any strides."""
    if left is None:
        return [None, None], dict(R=0, stride_lm=0, stride_lr=0, stride_rr=0, stride_ro=0, lora_scale=0.0,
                                  R_PAD=r_pad(0), HAS_LORA=False)
    r = left.shape[1]
    return [left, right_t], dict(R=r, stride_lm=left.stride(0), stride_lr=left.stride(1),
                                 stride_rr=right_t.stride(0), stride_ro=right_t.stride(1),
                                 lora_scale=float(scale), R_PAD=r_pad(r), HAS_LORA=True)


def _split_k(N: int, K: int, k_unit: int, device: torch.device) -> tuple[int, int]:
    """(splits, k_per_split) for decode: about two programs per SM, each at least 256 deep in K.

    k_per_split is a multiple of k_unit, which every BLOCK_K the configs may pick divides.
    """
    if interpreting():  # two splits where K allows, so the tests cover the partial-sum path
        splits = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(triton.cdiv(2 * sms, triton.cdiv(N, 64)), K // 256, MAX_SPLIT_K))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), k_unit) * k_unit
    return triton.cdiv(K, k_per_split), k_per_split


def _launch(tuned, grid, args: tuple, meta: dict, k_cap: int) -> None:
    """Autotuned on a GPU; under the interpreter, the fixed small config (BLOCK_K lowered to k_cap)."""
    if interpreting():
        config = {**INTERPRET_CONFIG, "BLOCK_K": min(INTERPRET_CONFIG["BLOCK_K"], k_cap)}
        tuned.fn[grid(config)](*args, **meta, **config)
    else:
        tuned[grid](*args, **meta)


def forward(x: torch.Tensor, qweight, bias, lora_left, lora_right_t, scale: float) -> torch.Tensor:
    """x (M, K), unit stride along K -> (M, N) in x.dtype. lora_right_t is B^T (r, N), any strides."""
    w_tensors, fmt = weight_args(qweight)
    return launch_forward((_qmm_skinny, _qmm_tiled), x, w_tensors, fmt, fmt["GROUP"], qweight.shape[0], bias,
                          lora_left, lora_right_t, scale)


def transposed(dy: torch.Tensor, qweight, lora_left, lora_right, scale: float) -> torch.Tensor:
    """dy (M, N), unit stride along N -> dy @ W' (+ scale * lora_left @ lora_right): (M, K) in dy.dtype."""
    w_tensors, fmt = weight_args(qweight)
    return launch_transposed(_qmm_t, dy, w_tensors, fmt, fmt["GROUP"], qweight.shape[1], lora_left, lora_right, scale)


def launch_forward(kernels: tuple, x: torch.Tensor, w_tensors: list, fmt: dict, group: int, N: int, bias,
                   lora_left, lora_right_t, scale: float) -> torch.Tensor:
    """The forward launch every dequant-matmul kernel pair shares (this module's NF4 / int4 and
    gguf_matmul_kernels' block formats take the same arguments around their weight pointers):
    kernels = (skinny, tiled); M <= SKINNY_M splits K and sums the fp32 partials."""
    M, K = x.shape
    lora_tensors, lora_meta = lora_args(lora_left, lora_right_t, scale)
    k_cap = block_k_cap(K, group)
    skinny = M <= SKINNY_M
    if skinny:
        k_unit = min(INTERPRET_CONFIG["BLOCK_K"], k_cap) if interpreting() else k_cap
        splits, k_per_split = _split_k(N, K, k_unit, x.device)
    else:
        splits, k_per_split = 1, K
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    target = out if splits == 1 else torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
    args = (x, *w_tensors, bias, *lora_tensors, target, M, N, K, k_per_split, m_bucket(M), x.stride(0), N, M * N)
    meta = dict(**fmt, **lora_meta, HAS_BIAS=bias is not None, INTERPRET_BF16=interpret_bf16(x.dtype))
    _launch(kernels[0] if skinny else kernels[1], tile_grid(M, N, "BLOCK_N", splits), args, meta, k_cap)
    if splits > 1:
        out.copy_(target.sum(dim=0))
    return out


def launch_transposed(kernel, dy: torch.Tensor, w_tensors: list, fmt: dict, group: int, K: int, lora_left,
                      lora_right, scale: float) -> torch.Tensor:
    """The dX = dY W' launch every transposed dequant kernel shares."""
    M, N = dy.shape
    lora_tensors, lora_meta = lora_args(lora_left, lora_right, scale)
    out = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    args = (dy, *w_tensors, *lora_tensors, out, M, N, K, m_bucket(M), dy.stride(0), K)
    meta = dict(**fmt, **lora_meta, INTERPRET_BF16=interpret_bf16(dy.dtype))
    _launch(kernel, tile_grid(M, K, "BLOCK_K"), args, meta, block_k_cap(K, group))
    return out
