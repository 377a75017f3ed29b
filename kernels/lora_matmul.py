"""Fused LoRA linear: y = x W^T (+ bias) + s * (dropout(x) A^T) B^T as ONE GEMM, and its backward.

Shapes: x (M, K) (leading dims flattened), W (N, K) frozen, A (r, K), B (N, r), h = dropout(x) A^T (M, r).

Forward (`_lora_fwd_kernel`, one program per (BLOCK_M, BLOCK_N) tile of y): the K loop loads the x
tile once and feeds two dots, acc += x W^T and acc_h += dropout(x) A^T, so the low-rank product
costs no extra pass over x; the epilogue adds (s * h) B^T and the bias. Every column block
recomputes its rows' h: r_pad / BLOCK_N extra tensor-core work (12% at r=16, 100% at r=128 with
BLOCK_N=128): free while the GEMM is memory-bound (small M); for compute-bound shapes at large r a
separate x A^T pass would be cheaper (not yet measured).

Dropout: a MATERIALISED keep mask, bool (M, K), drawn with torch's RNG (`bernoulli_`), read by the
forward and the backward kernel. Why not a tl.rand mask regenerated in-kernel: the forward would
regenerate it in each of the N / BLOCK_N column blocks, and one Philox-4x32-10 call is ~100 integer
ops per value against BLOCK_N (128) MACs on tensor cores that run ~30x faster (H100: 989 TFLOP/s
bf16 vs ~17 Tops int32), so the RNG would take ~20x the GEMM's own time. The mask costs 1 byte per
element of x, as much as torch's own dropout saves for its backward, and both paths (Triton and
the torch reference) draw it the same way, so for a given torch seed they use the same mask.

Precision: fp32 accumulation throughout; the fp32 rank-r intermediates enter fp16/bf16 dots as
hi + lo pairs (see _dot_lowrank_left). Autotuning only on CUDA; under TRITON_INTERPRET=1 fixed
16-wide blocks keep the CPU tests fast. Both kernels compile for sm_90 and sm_80 (Triton 3.9's
bundled ptxas, every dtype / mask / gradient variant) but have not yet run on a GPU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch

R_MAX = 128  # the (BLOCK_M, r_pad) fp32 accumulator lives in registers beside the output tile
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)  # tl.dot's minimum is 16

if dispatch.HAS_TRITON:
    import triton
    import triton.language as tl

    # dot, cast (INTERPRET_BF16: the interpreter's bf16 faults), grouped_tile and the rules these
    # kernels follow under the interpreter: _triton.py
    from ._triton import cast, dot, grouped_tile, interpret_bf16, is_hopper, m_bucket, r_pad, tile_grid

    @triton.jit
    def _dot_lowrank_left(x32, b, acc, INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr):
        """acc + x32 @ b: x32 an fp32 rank-r intermediate (s h or s dY B), b in the compute dtype.
        An fp16/bf16 dot needs x32 in b's dtype; rounding it once (as torch's bf16 path rounds h and
        dY B) made errors relative to the sum of |terms|, which broke the fp16 tolerance on cancelling
        dA entries (hypothesis, 300 examples). As hi + lo it keeps ~2x the mantissa bits, at the
        price of one more small (r-deep) dot, outside the main loops except for dB's owner programs."""
        if b.dtype == tl.float32:
            acc = dot(x32, b, acc, INTERPRET_BF16, PRECISION)
        else:
            hi = cast(x32, b.dtype, INTERPRET_BF16)
            lo = cast(x32 - hi.to(tl.float32), b.dtype, INTERPRET_BF16)
            acc = dot(lo, b, dot(hi, b, acc, INTERPRET_BF16, PRECISION), INTERPRET_BF16, PRECISION)
        return acc

    @triton.jit
    def _dot_lowrank_right(a, x32, acc, INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr):
        """acc + a @ x32, x32 fp32 split as in _dot_lowrank_left."""
        if a.dtype == tl.float32:
            acc = dot(a, x32, acc, INTERPRET_BF16, PRECISION)
        else:
            hi = cast(x32, a.dtype, INTERPRET_BF16)
            lo = cast(x32 - hi.to(tl.float32), a.dtype, INTERPRET_BF16)
            acc = dot(a, lo, dot(a, hi, acc, INTERPRET_BF16, PRECISION), INTERPRET_BF16, PRECISION)
        return acc

    @triton.jit
    def _lora_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, keep_ptr, y_ptr, h_ptr,
        M, N, K, r, scaling, inv_keep,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_ym, stride_yn, M_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STORE_H: tl.constexpr, R_PAD: tl.constexpr,
        INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        num_m, num_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
        pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rm * K passes 2**31 at M*K >= 2**31
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, R_PAD)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok, r_ok = rm < M, rn < N, rr < r
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk  # (BM, BK)
        w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn  # (BK, BN): W^T
        a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar  # (BK, R): A^T
        keep_ptrs = keep_ptr + rm[:, None] * K + rk[None, :]  # contiguous (M, K) uint8
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_h = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = rk < K - k0
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = dot(x, w, acc, INTERPRET_BF16, PRECISION)
            if HAS_MASK:  # zero the dropped inputs; the 1/(1-p) is applied once to h, in fp32
                keep = tl.load(keep_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
                x = tl.where(keep != 0, x, 0.0)
            acc_h = dot(x, a, acc_h, INTERPRET_BF16, PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
            keep_ptrs += BLOCK_K
        h = acc_h * inv_keep
        if STORE_H:  # saved for dB in backward; every column block holds the same h, the first stores it
            if pid_n == 0:
                tl.store(h_ptr + rm[:, None] * r + rr[None, :], h, mask=m_ok[:, None] & r_ok[None, :])
        b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (R, BN): B^T
        acc = _dot_lowrank_left(h * scaling, b, acc, INTERPRET_BF16, PRECISION)  # s on (BM, R), not (BM, BN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _lora_bwd_kernel(
        dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, keep_ptr, h_ptr, dx_ptr, da_ptr, db_ptr,
        M, N, K, r, scaling, inv_keep,
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_xm, stride_xk, stride_dxm, stride_dxk, M_BUCKET,
        HAS_MASK: tl.constexpr, NEED_DX: tl.constexpr, NEED_DLORA: tl.constexpr, R_PAD: tl.constexpr,
        INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One program per (BLOCK_M, BLOCK_K) tile of dX, looping over N (see LoraMatmulFunction)."""
        num_k = (K + BLOCK_K - 1) // BLOCK_K
        pid_m, pid_k = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, num_k, GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = tl.arange(0, R_PAD)
        rn = tl.arange(0, BLOCK_N)
        m_ok, k_ok, r_ok = rm < M, rk < K, rr < r
        dtype = dy_ptr.dtype.element_ty
        dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn  # (BM, BN)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk  # (BN, BK)
        b_ptrs = b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br  # (BN, R)
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
        g = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)  # dY B for this row block, built in the N loop
        h_ptrs = h_ptr + rm[:, None] * r + rr[None, :]
        for n_idx in range(0, (N + BLOCK_N - 1) // BLOCK_N):
            n_ok = rn < N - n_idx * BLOCK_N
            dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if NEED_DX:
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc = dot(dy, w, acc, INTERPRET_BF16, PRECISION)
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            g = dot(dy, b, g, INTERPRET_BF16, PRECISION)
            # dB += s dY^T h for this column block, while dY is in registers: one owner per column
            # block, spread round-robin over the K blocks so no program does all of them. h is
            # loaded here (an L2 hit) rather than held across the loop: that cut spills (ptxas, sm90)
            if NEED_DLORA:
                if n_idx % num_k == pid_k:
                    hs = tl.load(h_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0) * scaling
                    part = tl.full((BLOCK_N, R_PAD), 0.0, tl.float32)
                    part = _dot_lowrank_right(tl.trans(dy), hs, part, INTERPRET_BF16, PRECISION)
                    db_ptrs = db_ptr + (n_idx * BLOCK_N + rn)[:, None] * r + rr[None, :]
                    tl.atomic_add(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
            b_ptrs += BLOCK_N * stride_bn
        gs = g * scaling
        mk = m_ok[:, None] & k_ok[None, :]
        if HAS_MASK:
            keep = tl.load(keep_ptr + rm[:, None] * K + rk[None, :], mask=mk, other=0) != 0
        if NEED_DX:  # dX = dY W + (s dY B A) * keep / (1 - p)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # (R, BK)
            lora = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
            lora = _dot_lowrank_left(gs, a, lora, INTERPRET_BF16, PRECISION)
            if HAS_MASK:
                lora = tl.where(keep, lora * inv_keep, 0.0)
            acc += lora
            dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
            tl.store(dx_ptrs, cast(acc, dtype, INTERPRET_BF16), mask=mk)
        if NEED_DLORA:  # dA[:, k block] += (s dY B)^T dropout(x), summed over row blocks by atomics
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mk, other=0.0)
            if HAS_MASK:
                x = tl.where(keep, x, 0.0)
            part = tl.full((R_PAD, BLOCK_K), 0.0, tl.float32)
            part = _dot_lowrank_left(tl.trans(gs), x, part, INTERPRET_BF16, PRECISION)
            tl.atomic_add(da_ptr + rr[:, None] * K + rk[None, :], part * inv_keep,
                          mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


def _configs(backward: bool) -> list:
    """Autotune candidates. (BLOCK_M, output width, loop depth, stages, warps); the output width is
    BLOCK_N in forward and BLOCK_K in backward (whose loop runs over N). Ampere (A100: 164 KB shared
    memory per SM) fits 128x128 tiles at 3-4 stages; Hopper (228 KB, wgmma at 8 warps) adds 128x256.
    Small BLOCK_M tiles serve decode-sized M, where the W read dominates."""
    tiles = [(128, 128, 32, 4, 4), (128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4)]
    if is_hopper():
        tiles += [(128, 256, 64, 3, 8), (64, 256, 64, 4, 8)]
    out, loop = ("BLOCK_K", "BLOCK_N") if backward else ("BLOCK_N", "BLOCK_K")
    return [triton.Config({"BLOCK_M": bm, out: bo, loop: bl, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bo, bl, s, w in tiles]


def _prune(configs, named_args, out_block: str, **kwargs) -> list:
    """Drop tiles whose fp32 accumulators (output tile + the (BLOCK_M, r_pad) LoRA tile) exceed ~160
    registers per thread: past that they spill (255 is the hardware cap, operands need the rest)."""
    pad = kwargs["R_PAD"]
    fits = [c for c in configs
            if c.kwargs["BLOCK_M"] * (c.kwargs[out_block] + pad) / (32 * c.num_warps) <= 160]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs[out_block])]


@functools.cache
def _tuned(backward: bool):
    key = ["M_BUCKET", "N", "K", "R_PAD", "HAS_MASK"] + (["NEED_DX", "NEED_DLORA"] if backward else [])
    prune = {"early_config_prune": functools.partial(_prune, out_block="BLOCK_K" if backward else "BLOCK_N")}
    kernel = _lora_bwd_kernel if backward else _lora_fwd_kernel
    # reset_to_zero: the dA / dB buffers accumulate by atomics, so each benchmark run starts from 0
    reset = ["da_ptr", "db_ptr"] if backward else None
    return triton.autotune(_configs(backward), key=key, prune_configs_by=prune, reset_to_zero=reset)(kernel)


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own switch (default off: exact fp32, like cuBLAS without TF32);
    for fp16/bf16 operands the setting has no effect."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(backward: bool, grid_cols: int, M: int, args: tuple, consts: dict) -> None:
    dtype = args[0].dtype
    consts = dict(consts, PRECISION=_precision(dtype), INTERPRET_BF16=interpret_bf16(dtype))
    grid = tile_grid(M, grid_cols, "BLOCK_K" if backward else "BLOCK_N")
    if dispatch.interpreting():  # no benchmarking on CPU: fixed small blocks
        kernel = _lora_bwd_kernel if backward else _lora_fwd_kernel
        kernel[grid](*args, m_bucket(M), **consts, **INTERPRET_CONFIG)
    else:
        _tuned(backward)[grid](*args, m_bucket(M), **consts)


def _inv_keep(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0  # p == 1 drops everything (nn.Dropout allows it)


def _keep_mask(M: int, K: int, device, dropout_p: float, training: bool) -> torch.Tensor | None:
    """bool (M, K), True = kept; None when dropout is off. Shaped (M, K) on both paths so one torch
    seed gives the Triton path and the reference the same mask."""
    if not training or dropout_p == 0.0:
        return None
    return torch.empty((M, K), dtype=torch.bool, device=device).bernoulli_(1.0 - dropout_p)


def _forward(x, weight, bias, lora_A, lora_B, scaling, keep, inv_keep, store_h: bool):
    """y (M, N) in x's dtype, and h = dropout(x) A^T (M, r) in fp32 when store_h (else None)."""
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, r), dtype=torch.float32, device=x.device) if store_h else None
    args = (x, weight, x if bias is None else bias, lora_A, lora_B, x if keep is None else keep.view(torch.uint8),
            y, y if h is None else h, M, N, K, r, float(scaling), inv_keep,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1))
    consts = dict(HAS_BIAS=bias is not None, HAS_MASK=keep is not None, STORE_H=store_h, R_PAD=r_pad(r))
    _launch(False, N, M, args, consts)
    return y, h


def _backward(dy, x, weight, lora_A, lora_B, keep, h, scaling, inv_keep, need_dx: bool, need_dlora: bool):
    """(dX or None, dA fp32 or None, dB fp32 or None) from one launch of _lora_bwd_kernel."""
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    dx = torch.empty_like(x) if need_dx else None
    da = torch.zeros((r, K), dtype=torch.float32, device=x.device) if need_dlora else None
    db = torch.zeros((N, r), dtype=torch.float32, device=x.device) if need_dlora else None
    # placeholders for pointers a disabled branch never touches; da / db get a private one because
    # the autotuner zeroes them (reset_to_zero) before each benchmark run
    dx_, unused = dy if dx is None else dx, torch.empty(1, dtype=torch.float32, device=x.device)
    args = (dy, weight, lora_A, lora_B, x, x if keep is None else keep.view(torch.uint8),
            dy if h is None else h, dx_, unused if da is None else da, unused if db is None else db,
            M, N, K, r, float(scaling), inv_keep,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), x.stride(0), x.stride(1), dx_.stride(0), dx_.stride(1))
    consts = dict(HAS_MASK=keep is not None, NEED_DX=need_dx, NEED_DLORA=need_dlora, R_PAD=r_pad(r))
    _launch(True, K, M, args, consts)
    return dx, da, db


class LoraMatmulFunction(torch.autograd.Function):
    """y = x W^T + b + s h B^T, h = d(x) A^T, d(x) = x * keep / (1 - p); x (M, K), g := dY B (M, r).

    Gradients (dY = dL/dy, (M, N)):
        dX = dY W + s (dY B A) * keep / (1 - p)   (the LoRA branch's gradient passes back through dropout)
        dA = s (dY B)^T d(x) = s g^T d(x)          (r, K)
        dB = s dY^T h                              (N, r)
        dW = dY^T x,  db = sum_rows dY             (only when W / b require grad: frozen in LoRA)

    What to save: dA needs d(x) and dB needs h. Saving h (M, r, fp32: r/K of x's size) costs nothing
    next to recomputing it (a pass over x); d(x) is NOT saved: x (which the base GEMM's caller keeps
    anyway) and the 1-byte keep mask rebuild it where it is read, instead of storing a second
    (M, K) activation as torch's Dropout + Linear does. So save x, keep, h, W, A, B.

    Passes: ONE kernel, a program per (BLOCK_M, BLOCK_K) tile of dX looping over N. The loop
    streams dY and W (the dY W GEMM) and also accumulates g = dY B for its rows; each column block
    of dY adds its dB share s dY_blk^T h while the tile is in registers (atomic fp32 adds, one owner
    program per column block). The epilogue adds s g A (masked) to dX and adds s g^T d(x_tile) into
    dA (atomics over row blocks); this reads each x tile and mask tile exactly once. So the backward
    reads dY as the dX GEMM must, x and keep once, and writes dX once; a naive autograd graph makes
    separate passes for dY B, dY^T h, g A, the dropout backward and the final dX sum.
    g is recomputed by each of the K / BLOCK_K column programs: r_pad / BLOCK_K extra dot work.
    Precision: accumulators are fp32; the fp32 rank-r intermediates s h and s g enter fp16/bf16
    dots as hi + lo pairs (_dot_lowrank_left), so they are not rounded to 8 or 11 bits as in torch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, keep, dropout_p):
        inv_keep = _inv_keep(dropout_p) if keep is not None else 1.0
        need_dlora = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        y, h = _forward(x, weight, bias, lora_A, lora_B, scaling, keep, inv_keep, store_h=need_dlora)
        ctx.save_for_backward(x, weight, lora_A, lora_B, keep, h)
        ctx.scaling, ctx.inv_keep = scaling, inv_keep
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, keep, h = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_dB = ctx.needs_input_grad[:5]
        dy = dy.to(x.dtype)
        dx = da = db = None
        if need_dx or need_da or need_dB:
            dx, da, db = _backward(dy, x, weight, lora_A, lora_B, keep, h, ctx.scaling, ctx.inv_keep,
                                   need_dx, need_da or need_dB)
        dw = dy.t().mm(x).to(weight.dtype) if need_dw else None  # frozen in LoRA: plain cuBLAS if not
        dbias = dy.sum(0) if need_db else None
        da = da.to(lora_A.dtype) if need_da else None
        db = db.to(lora_B.dtype) if need_dB else None
        return dx, dw, dbias, da, db, None, None, None


def _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p) -> None:
    """Clear errors naming the tensor and both shapes; every operand shares x's dtype and device."""
    def fail(msg):
        raise ValueError(f"lora_matmul: {msg}")

    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        fail(f"expected x (..., K), weight (N, K), lora_A (r, K), lora_B (N, r); got x {tuple(x.shape)}, "
             f"weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    K, (N, r) = x.shape[-1], lora_B.shape
    if weight.shape[1] != K:
        fail(f"weight {tuple(weight.shape)} has {weight.shape[1]} input features but x {tuple(x.shape)} has {K}")
    if lora_A.shape != (r, K):
        fail(f"lora_A has shape {tuple(lora_A.shape)}, expected (r, K) = {(r, K)} from lora_B {tuple(lora_B.shape)} "
             f"and x {tuple(x.shape)}")
    if N != weight.shape[0]:
        fail(f"lora_B {tuple(lora_B.shape)} has {N} output features "
             f"but weight {tuple(weight.shape)} has {weight.shape[0]}")
    if bias is not None and tuple(bias.shape) != (N,):
        fail(f"bias has shape {tuple(bias.shape)}, expected ({N},) for weight {tuple(weight.shape)}")
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in named.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            fail(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; cast them to one dtype")
    if x.dtype not in dispatch.DTYPES:
        fail(f"x is {x.dtype}; supported dtypes are {dispatch.DTYPES}")
    if not 0.0 <= dropout_p <= 1.0:
        fail(f"dropout_p must be in [0, 1], got {dropout_p}")


def lora_matmul_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """Pure torch: the CPU path and the test oracle. Same signature and same dropout mask per seed."""
    _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
    K = x.shape[-1]
    keep = _keep_mask(x.numel() // max(K, 1), K, x.device, dropout_p, training)
    x_lora = x if keep is None else x * keep.view(x.shape) * _inv_keep(dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def lora_matmul(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """x (..., K) -> (..., N): x W^T + bias + scaling * dropout(x) A^T B^T; Triton where dispatch says so.

    Ranks above R_MAX and empty inputs take the reference (the kernel holds r_pad columns in registers).
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    if not dispatch.use_triton(*tensors) or lora_A.shape[0] > R_MAX or x.numel() == 0:
        return lora_matmul_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    keep = _keep_mask(x2.shape[0], K, x.device, dropout_p, training)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y = LoraMatmulFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), keep, float(dropout_p))
    else:  # inference: no autograd node, and h is not written
        inv_keep = _inv_keep(dropout_p) if keep is not None else 1.0
        y = _forward(x2, weight, bias, lora_A, lora_B, scaling, keep, inv_keep, store_h=False)[0]
    return y.view(*x.shape[:-1], N)
