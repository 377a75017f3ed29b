"""The torch path's fused LoRA linear: base GEMM + LoRA branch + sparse dropout in one autograd Function.

On CPU (and on CUDA without Triton) LoraLinear runs this instead of base(x) + B(A(dropout(x))):
the small GEMM writes the output once and the base GEMM accumulates into it, backward takes the
fewest passes, and dropout keeps the dropped positions (about p * numel indices) instead of a float
mask as large as x. peftcore.kernels.lora_matmul is the Triton counterpart.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SPARSE_DROPOUT_MAX_P = 0.25  # the fused path samples dropped positions; above this rate it falls back
SPARSE_DROPOUT_MIN_P = 1e-6  # below it the sum of the sampled gaps between drops could overflow int64


def dropped_positions(numel: int, p: float, device=None) -> torch.Tensor:
    """Sorted flat indices of the elements that dropout with probability p drops from numel elements.

    Each element is dropped independently with probability p, as by nn.Dropout, but instead of one
    Bernoulli draw per element (~5 ns each on CPU: 10 ms for 2M elements) this draws the gaps between
    drops, which are i.i.d. Geometric(p) on {1, 2, ...} (torch's geometric_): about p * numel draws
    and a cumulative sum. Same distribution as nn.Dropout, a different random stream.
    """
    mean = numel * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)  # one batch suffices but ~1e-9 of the time
    chunks, last = [], -1
    while last < numel - 1:
        gaps = torch.empty(count, dtype=torch.int64, device=device).geometric_(p)
        gaps[0] += last
        pos = gaps.cumsum_(0)
        chunks.append(pos)
        last = int(pos[-1])
    pos = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return pos[: int(torch.searchsorted(pos, numel))]


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T around a frozen (W, b), in the fewest passes.

    With M rows (tokens), mask the kept elements, s' = s / (1 - p) and h = (x * mask) A^T (M, r):
      forward   out  = b + s' h B^T        the small GEMM writes (M, N) once
                out += x W^T               the base GEMM accumulates into it (beta = 1): no add pass
      backward  dh = s' g B                (M, r), g = dL/dy
                dB = s' (h^T g)^T          h^T made contiguous first: MKL's faster layout here
                dA = dh^T (x * mask)
                dx = (dh A) * mask + g W   dropped entries zeroed in the small product, then the base
                                           GEMM accumulates into it (beta = 1)
                db = sum over rows of g    only when the base bias trains (bias="all")
    Saved: x * mask (x itself when p = 0; W is frozen, so x is not needed otherwise), h, the dropped
    positions. A quantized base passes W = None and its `dequantize`: W is then a temporary in
    forward and dequantized again in backward, never kept between them (QLoRA's point). Against
    autograd on the module graph this drops the float dropout mask (M, K), its
    multiplies in both directions, the (M, N) scale/add passes and the (M, K) add of the two input
    gradients. Checked against autograd of the plain formula in tests (every gradient).
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s: float, p: float, dequantize=None):
        shape = x.shape
        ctx.dequantize = dequantize
        weight = W if dequantize is None else dequantize()
        x2 = x.reshape(-1, shape[-1])
        pos = None
        if p > 0:
            pos = dropped_positions(x2.numel(), p, x2.device)
            x_lora = x2.clone()
            x_lora.view(-1).index_fill_(0, pos, 0)
            s = s / (1.0 - p)
        else:
            x_lora = x2
        h = F.linear(x_lora, A)  # (M, r)
        if b is None:
            out = torch.addmm(h.new_zeros(()), h, B.T, beta=0, alpha=s)
        else:
            out = torch.addmm(b, h, B.T, alpha=s)
        out.addmm_(x2, weight.T)
        ctx.save_for_backward(W, A, B, x_lora if A.requires_grad else None, h if B.requires_grad else None, pos)
        ctx.s, ctx.x_shape = s, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        W, A, B, x_lora, h, pos = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx = db = dA = dB = None
        if need_x or need_A:
            dh = torch.mm(g2, B * s)  # (M, r)
        if need_A:
            dA = torch.mm(dh.T, x_lora)
        if need_B:
            dB = torch.mm(h.T.contiguous(), g2).mul_(s).T
        if need_x:
            dx = torch.mm(dh, A)
            if pos is not None:
                dx.view(-1).index_fill_(0, pos, 0)
            dx = dx.addmm_(g2, W if ctx.dequantize is None else ctx.dequantize()).view(ctx.x_shape)
        if need_b:
            db = g2.sum(0)
        return dx, None, db, dA, dB, None, None, None
