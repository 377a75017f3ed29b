"""One entry for a linear layer with one LoRA adapter, y = x W^T + b + s * dropout(x) A^T B^T, and the one
test that picks how it runs.

Paths, best first:
  "triton"  one fused kernel: lora_matmul for a dense W, quant_matmul (LoRA in its epilogue) for a quantized W
  "torch"   lora_torch.LoraLinearFunction: the base GEMM and the LoRA branch as one autograd Function
  None      neither applies; the caller runs its modules, base(x) + B(A(dropout(x))) * s
All three compute the same thing; the tests check each against the others.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Modules, not names: the kernel tests reload them under TRITON_INTERPRET=1, and this entry must then
# call the reloaded kernels (and see the reloaded dispatch switch).
from . import dispatch, lora_matmul, quant_matmul
from .lora_torch import SPARSE_DROPOUT_MAX_P, SPARSE_DROPOUT_MIN_P, LoraLinearFunction
from .quant_matmul import QuantWeight

TRITON, TORCH = "triton", "torch"


@dataclass(frozen=True)
class LinearWeights:
    """A base linear as the fused paths see it: W (N, K) dense or quantized, its bias, and the dtype it
    computes in (a quantized W has no dtype of its own)."""

    weight: torch.Tensor | QuantWeight
    bias: torch.Tensor | None
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return not isinstance(self.weight, torch.Tensor)


def path(x: torch.Tensor, base: LinearWeights, A: torch.Tensor, B: torch.Tensor, dropout_p: float) -> str | None:
    """TRITON, TORCH, or None (run the modules). `dropout_p`: the rate applied now (0 in eval mode).

    Both fused paths take one dtype throughout: fp32 adapters on a half-precision base (PEFT's default)
    stay with the modules, which sum in the adapter's dtype as PEFT does.
    """
    operands = (x, A, B) if base.bias is None else (x, A, B, base.bias)
    if any(t.dtype != base.dtype for t in operands):
        return None
    if dispatch.use_triton(x) and x.dtype in dispatch.DTYPES:
        return TRITON
    # LoraLinearFunction returns no gradient for W, and autocast would re-type its GEMMs inside it
    trainable_weight = not base.quantized and base.weight.requires_grad
    sparse_dropout = dropout_p == 0.0 or SPARSE_DROPOUT_MIN_P <= dropout_p <= SPARSE_DROPOUT_MAX_P
    if trainable_weight or not sparse_dropout or torch.is_autocast_enabled(x.device.type):
        return None
    return TORCH


def lora_linear(x: torch.Tensor, base: LinearWeights, A: torch.Tensor, B: torch.Tensor, scale: float,
                dropout_p: float = 0.0, route: str | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) on `route` (default: what `path` picks). A (r, K), B (N, r)."""
    route = route or path(x, base, A, B, dropout_p)
    if route == TRITON and base.quantized:
        dropped = F.dropout(x, dropout_p) if dropout_p > 0 else None  # nn.Dropout's draw: the same stream
        return quant_matmul.quant_matmul(x, base.weight, base.bias, quant_matmul.LoraTerm(A, B, scale, dropped))
    if route == TRITON:
        return lora_matmul.lora_matmul(x, base.weight, base.bias, A, B, scale, dropout_p, training=dropout_p > 0)
    if route == TORCH:
        # a quantized W is dequantized inside the Function, forward and backward, and never kept between them
        dequantize = functools.partial(quant_matmul.dequantize, base.weight, base.dtype) if base.quantized else None
        W = None if base.quantized else base.weight
        return LoraLinearFunction.apply(x, W, base.bias, A, B, scale, dropout_p, dequantize)
    raise ValueError(f"no fused LoRA path takes x {x.dtype} on {x.device} with a {base.dtype} base, adapter "
                     f"{A.dtype} and dropout {dropout_p}; run the layer's modules (LoraLinear does) instead")
