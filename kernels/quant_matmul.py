"""y = x W'^T (+ bias) (+ s * (x A^T) B^T) with W' a frozen NF4 / int4 / int8 weight: QLoRA's linear.

The four parts every kernel module has (jit kernels, launcher, torch reference, autograd Function);
the Triton half lives in quant_matmul_kernels.py:
  kernels     quant_matmul_kernels: forward (tiled GEMM; split-K for M <= 16) and transposed
              (dX = dY W') kernels, both dequantizing W' tile by tile, with an optional LoRA epilogue.
  launcher    quant_matmul(x, qweight, bias=None, lora=None): checks, then QuantMatmulFunction,
              which takes the Triton kernels when dispatch.use_triton(x) and the torch math otherwise.
  reference   quant_matmul_reference: dequantize with kernels/quant.py, then F.linear (the oracle).
  autograd    QuantMatmulFunction: the backward derivation is in its docstring.

Which weights the kernels take; the others take the torch path (same math, the dense W' built
once per call): NF4 with in_features K % 64 == 0, so every 64-weight absmax block lies inside one
row (the kernels load one absmax per row and block; with K % 64 != 0 blocks straddle rows -- rare
in practice, and bitsandbytes' own layout); int4 whose K and group_size admit a power-of-two
K tile of at least 16 (tl.dot's minimum; the kernels do not mask K), which every group size that
is a multiple of 16 does. K % group_size != 0 cannot reach here: quant.int4_quantize raises, and
check_inputs rejects a hand-built Int4Weight. Int8 weights take the torch path (no kernel yet).
GGUF blocks (BlockWeight, quantize="keep"): Q8_0 / Q4_0 / Q4_1 take gguf_matmul_kernels (same tiling,
split-K and LoRA epilogue); the other block types take the torch path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import gguf_blocks
from .dispatch import DTYPES, HAS_TRITON, use_triton
from .gguf_blocks import BlockWeight
from .quant import Int4Weight, Int8Weight, NF4Weight, int4_dequantize, int8_dequantize, nf4_dequantize

if HAS_TRITON:
    from . import gguf_matmul_kernels as gguf_kernels
    from . import quant_matmul_kernels as kernels

QuantWeight = NF4Weight | Int4Weight | Int8Weight | BlockWeight
WEIGHT_TYPES = (NF4Weight, Int4Weight, Int8Weight, BlockWeight)


@dataclass(frozen=True)
class LoraTerm:
    """The adapter added to the quantized base: scale * (x A^T) B^T (HF PEFT: lora_B(lora_A(x)) * scaling).

    A is lora_A.weight (r, K), B is lora_B.weight (N, r); dropped_x, when the adapter uses dropout,
    is dropout(x): the LoRA branch reads it instead of x (PEFT drops out the LoRA input only).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropped_x: torch.Tensor | None = None


def dequantize(qweight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense (N, K) weight in `dtype`, exactly as the spec (kernels/quant.py) dequantizes it."""
    if isinstance(qweight, NF4Weight):
        return nf4_dequantize(qweight, dtype)
    if isinstance(qweight, Int4Weight):
        return int4_dequantize(qweight, dtype)
    if isinstance(qweight, Int8Weight):
        return int8_dequantize(qweight, dtype)
    if isinstance(qweight, BlockWeight):
        return gguf_blocks.dequantize(qweight, dtype)
    raise TypeError(f"qweight must be NF4Weight, Int4Weight, Int8Weight or BlockWeight, got {type(qweight).__name__}")


def quant_matmul_reference(x: torch.Tensor, qweight: QuantWeight, bias: torch.Tensor | None = None,
                           lora: LoraTerm | None = None) -> torch.Tensor:
    """The oracle: dequantize W' in x.dtype, then F.linear; plain autograd (it keeps W' for backward)."""
    y = F.linear(x, dequantize(qweight, x.dtype), bias)
    if lora is not None:
        lora_input = x if lora.dropped_x is None else lora.dropped_x
        y = y + lora.scale * F.linear(F.linear(lora_input, lora.A), lora.B)
    return y


# ---------------------------------------------------------------------------------------------
# Checks: every error names what was wrong (with both shapes) and what to do.
# ---------------------------------------------------------------------------------------------
def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_nf4(w: NF4Weight) -> None:
    N, K = w.shape
    blocks = -(-N * K // 64)
    _expect(w.packed.dtype == torch.uint8 and w.packed.numel() == -(-N * K // 2),
            f"NF4 packed must be uint8 with ceil(N*K/2) = {-(-N * K // 2)} bytes for shape {(N, K)}, "
            f"got {w.packed.dtype} with {w.packed.numel()}; quantize with quant.nf4_quantize")
    _expect(w.absmax.numel() == blocks, f"NF4 absmax must hold ceil(N*K/64) = {blocks} values for shape "
            f"{(N, K)}, got {w.absmax.numel()}")
    if w.double_quant:
        _expect(w.absmax.dtype == torch.uint8 and w.absmax_offset is not None
                and w.absmax_scale.numel() == -(-blocks // 256),
                f"double-quantized NF4 needs uint8 absmax codes, an offset and ceil({blocks}/256) scales; "
                f"got absmax {w.absmax.dtype}, {w.absmax_scale.numel()} scales")
    else:
        _expect(w.absmax.dtype == torch.float32, f"NF4 absmax must be float32, got {w.absmax.dtype}")


def _check_int4(w: Int4Weight) -> None:
    N, K = w.shape
    groups = (N, K // w.group_size)
    _expect(K % w.group_size == 0, f"int4 in_features {K} is not a multiple of group_size {w.group_size}; "
            "re-quantize with a group size that divides it (quant.int4_quantize checks this)")
    _expect(w.packed.dtype == torch.uint8, f"int4 packed must be uint8, got {w.packed.dtype}")
    for name in ("scale", "zero"):
        t = getattr(w, name)
        _expect(tuple(t.shape) == groups and t.dtype == torch.float32,
                f"int4 {name} must be float32 of shape (N, K / group_size) = {groups}, "
                f"got {t.dtype} {tuple(t.shape)}")


def _check_lora(x: torch.Tensor, lora: LoraTerm, N: int, K: int) -> None:
    A, B = lora.A, lora.B
    _expect(A.dim() == 2 and A.shape[1] == K, f"lora A must be (r, in_features={K}), got {tuple(A.shape)}")
    r = A.shape[0]
    _expect(tuple(B.shape) == (N, r), f"lora B must be (out_features, r) = {(N, r)}, got {tuple(B.shape)}")
    _expect(A.dtype == B.dtype == x.dtype, f"lora A and B must have x's dtype {x.dtype}, got {A.dtype} and "
            f"{B.dtype}: cast the adapter or the input first")
    if lora.dropped_x is not None:
        _expect(lora.dropped_x.shape == x.shape and lora.dropped_x.dtype == x.dtype,
                f"lora.dropped_x must match x ({tuple(x.shape)}, {x.dtype}), got "
                f"{tuple(lora.dropped_x.shape)}, {lora.dropped_x.dtype}")


def check_inputs(x: torch.Tensor, qweight: QuantWeight, bias: torch.Tensor | None, lora: LoraTerm | None) -> None:
    if not isinstance(qweight, WEIGHT_TYPES):
        raise TypeError(f"qweight must be NF4Weight, Int4Weight, Int8Weight or BlockWeight, "
                        f"got {type(qweight).__name__}")
    _expect(len(qweight.shape) == 2, f"qweight must be a 2-D (out, in) weight, got shape {tuple(qweight.shape)}")
    N, K = qweight.shape
    _expect(x.dtype in DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _expect(x.dim() >= 1 and x.shape[-1] == K, f"x's last dim must be in_features {K}: x {tuple(x.shape)}, "
            f"weight {(N, K)}")
    if isinstance(qweight, NF4Weight):
        _check_nf4(qweight)
    elif isinstance(qweight, Int4Weight):
        _check_int4(qweight)
    stored = qweight.packed if not isinstance(qweight, Int8Weight) else qweight.q
    others = [("bias", bias)] + ([] if lora is None else [("lora A", lora.A), ("lora B", lora.B)])
    for name, t in [("the weight", stored)] + [(n, t) for n, t in others if t is not None]:
        _expect(t.device == x.device, f"x is on {x.device} but {name} on {t.device}: move them to one device")
    if bias is not None:
        _expect(tuple(bias.shape) == (N,) and bias.dtype in DTYPES,
                f"bias must be a float16 / bfloat16 / float32 ({N},), got {bias.dtype} {tuple(bias.shape)}")
    if lora is not None:
        _check_lora(x, lora, N, K)


# ---------------------------------------------------------------------------------------------
# Paths: the Triton kernels, or the same math in torch.
# ---------------------------------------------------------------------------------------------
def kernel_supports(qweight: QuantWeight) -> bool:
    """The formats and shapes the Triton kernels take (module docstring)."""
    if not HAS_TRITON:
        return False
    if isinstance(qweight, BlockWeight):
        return gguf_kernels.supports(qweight)
    return isinstance(qweight, (NF4Weight, Int4Weight)) and kernels.supports(qweight)


def kernel_module(qweight: QuantWeight):
    """gguf_matmul_kernels for GGUF blocks, quant_matmul_kernels for NF4 / int4."""
    return gguf_kernels if isinstance(qweight, BlockWeight) else kernels


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C) with unit stride along C, which the kernels assume."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_triton(t: torch.Tensor, qweight: QuantWeight) -> bool:
    """Triton for supported weights on a Triton device; an empty batch has nothing to launch."""
    return kernel_supports(qweight) and t.numel() > 0 and use_triton(t, qweight.packed)


def _forward(x2, qweight, bias, z, B, scale):
    """x2 (M, K) -> (M, N); z = (lora input) A^T (M, r) or None."""
    if _on_triton(x2, qweight):
        return kernel_module(qweight).forward(x2, qweight, bias, z, None if z is None else B.t(), scale)
    y = F.linear(x2, dequantize(qweight, x2.dtype), bias)
    return y if z is None else y + scale * F.linear(z, B)


def _transposed(g, qweight, gB, A, scale):
    """g (M, N) -> g W' (+ scale * gB A) (M, K)."""
    if _on_triton(g, qweight):
        return kernel_module(qweight).transposed(g, qweight, gB, A, scale)
    dx = g @ dequantize(qweight, g.dtype)
    return dx if gB is None else dx + scale * (gB @ A)


class QuantMatmulFunction(torch.autograd.Function):
    """Y = X W'^T + b + s Z B^T with Z = X_l A^T, where X_l is X (or dropout(X)) and W' is frozen.

    Shapes: X (M, K) (leading dims flattened), W' (N, K), A (r, K), B (N, r), Y and G = dL/dY (M, N).
    Y_ij = sum_k X_ik W'_jk + b_j + s sum_q Z_iq B_jq, with Z_iq = sum_k X_l,ik A_qk. Then:
      dX   = G W'                      (M, K)  dL/dX_ik = sum_j G_ij W'_jk: the transposed kernel
      dZ   = s G B                     (M, r)
      dB   = s G^T Z                   (N, r)  dL/dB_jq = s sum_i G_ij Z_iq
      dA   = dZ^T X_l = s (G B)^T X_l  (r, K)  dL/dA_qk = sum_i dZ_iq X_l,ik
      dX_l = dZ A = s (G B) A          (M, K)  added to dX when X_l is X: the transposed kernel's
                                               epilogue adds the (BLOCK_M, r) x (r, BLOCK_K) tile
      db   = sum_i G_i                 (N,)
    and no gradient for W' (frozen, quantized). Saved: Z (M x r, small) when B needs a gradient,
    X_l when A does, and A, B (parameters, no copy). Not saved: W' (the kernel re-dequantizes it
    tile by tile), Y, or X when A is frozen.
    """

    @staticmethod
    def forward(ctx, x, qweight, bias, A, B, scale, dropped_x):
        x2 = _rows(x)
        lora_input = None if A is None else (x2 if dropped_x is None else _rows(dropped_x))
        z = None if A is None else F.linear(lora_input, A)
        y = _forward(x2, qweight, bias, z, B, scale)
        ctx.qweight, ctx.scale, ctx.x_shape = qweight, scale, x.shape
        ctx.has_lora, ctx.separate_input = A is not None, dropped_x is not None
        need_dA, need_dB = (A is not None and ctx.needs_input_grad[i] for i in (3, 4))
        ctx.save_for_backward(lora_input if need_dA else None, z if need_dB else None, A, B)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        lora_input, z, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = _rows(dy)
        gB = g @ B if ctx.has_lora and (need[0] or need[3] or need[6]) else None
        dx = dbias = dA = dB = d_dropped = None
        if need[0]:
            fuse = ctx.has_lora and not ctx.separate_input
            dx = _transposed(g, ctx.qweight, gB if fuse else None, A if fuse else None, ctx.scale)
            dx = dx.view(ctx.x_shape)
        if need[6]:
            d_dropped = (ctx.scale * (gB @ A)).view(ctx.x_shape)
        if need[2]:
            dbias = g.sum(dim=0)
        if need[3]:
            dA = ctx.scale * (gB.t() @ lora_input)
        if need[4]:
            dB = ctx.scale * (g.t() @ z)
        return dx, None, dbias, dA, dB, None, d_dropped


def quant_matmul(x: torch.Tensor, qweight: QuantWeight, bias: torch.Tensor | None = None,
                 lora: LoraTerm | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype: x W'^T (+ bias) (+ lora.scale * (x A^T) B^T), differentiable.

    x: float16 / bfloat16 / float32. qweight: NF4Weight / Int4Weight / Int8Weight of shape (N, K).
    bias: (N,), cast to x's dtype. lora: a LoraTerm whose A, B have x's dtype. Gradients flow to x, bias,
    A, B and lora.dropped_x; the quantized weight is frozen. Raises ValueError / TypeError on a
    mismatch (the message names both shapes). On CUDA (or CPU under TRITON_INTERPRET=1) supported
    weights run the Triton kernels, fp32 inputs as tf32 dots on the GPU (~1e-3 relative: the
    tolerance table's cuda_fp32 row); elsewhere the same math in torch.
    """
    check_inputs(x, qweight, bias, lora)
    if bias is not None and bias.dtype != x.dtype:  # a quantized layer may keep its bias in another dtype
        bias = bias.to(x.dtype)  # differentiable: the gradient comes back in the bias's dtype
    if lora is None:
        return QuantMatmulFunction.apply(x, qweight, bias, None, None, 0.0, None)
    return QuantMatmulFunction.apply(x, qweight, bias, lora.A, lora.B, float(lora.scale), lora.dropped_x)
