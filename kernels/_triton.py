"""What the Triton kernel modules share: @triton.jit building blocks and host-side launch arithmetic.

Used by lora_matmul.py and quant_matmul_kernels.py; imported only where triton is installed
(dispatch.HAS_TRITON), so it imports triton plainly.

Interpreter rules every jit function here and in the kernel modules follows:
- No triton.language @jit helpers (tl.cdiv, tl.zeros, tl.sum, ...; hence tl.full and
  (a + b - 1) // b in the kernels): they are decorated when triton is imported, so when
  TRITON_INTERPRET=1 is set later (a test that reloads the kernel modules) they stay compiled-mode
  functions that the interpreter refuses to call (checked on triton 3.9).
- The same holds for the helpers below: Triton picks interpreted or compiled mode when @triton.jit
  decorates, so this module must be (re)imported under the same TRITON_INTERPRET as the kernels
  that call it, and before them (tests/kernels/interpreter.py reloads dispatch, this, then them).
  A kernel calls a helper from here like one of its own module (checked: interpreted, and compiled
  offline for sm_80 / sm_90 by the slow tests).

bf16 under the interpreter (triton 3.9's runtime/interpreter.py), the reason for INTERPRET_BF16:
- tl.dot on bf16 operands returns garbage: bf16 is held as uint16 and create_dot hands the raw
  arrays to np.matmul, so the bit patterns are multiplied as integers (triton #11584, "not
  supported yet"; a 16x16x16 dot of randn values came out 2e10 off). fp32 and fp16 dots are right.
- The fp32 -> bf16 cast truncates: cast_impl calls _convert_float without a rounding mode, so a
  value comes out up to 1 ulp toward zero (530 of 1024 randn values, seed 0, differed from
  torch's .to()), and the CPU run would not show the GPU's round-to-nearest-even numbers.
The launchers set the constexpr INTERPRET_BF16 (interpret_bf16) when interpreting bf16; dot then
runs in fp32 and cast rounds in integer ops. The GPU path keeps bf16 dots and native casts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

DOT_MIN = 16  # tl.dot's smallest M, N and K
MAX_M_BUCKET = 8192


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def interpret_bf16(dtype: torch.dtype) -> bool:
    """The INTERPRET_BF16 constexpr: interpreting, with bf16 operands (module docstring)."""
    return interpreting() and dtype == torch.bfloat16


def is_hopper() -> bool:
    """Whether the running GPU is Hopper (sm_90) or newer: the autotune lists add its larger tiles."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def r_pad(r: int) -> int:
    """The R_PAD constexpr for a rank-r LoRA tile: a power of two (tl.arange) and at least DOT_MIN."""
    return max(DOT_MIN, triton.next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotune key for M: powers of two (capped), so a new sequence length does not re-tune."""
    return min(triton.next_power_of_2(M), MAX_M_BUCKET)


def tile_grid(M: int, cols: int, col_block: str, *more: int):
    """Launch grid for grouped_tile: axis 0 has one program per (BLOCK_M, meta[col_block]) tile of
    an (M, cols) output; `more` are the further axes."""
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta[col_block]), *more)
    return grid


# ---------------------------------------------------------------------------------------------
# @triton.jit building blocks
# ---------------------------------------------------------------------------------------------
@triton.jit
def dot(a, b, acc, INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr = None):
    """acc + a @ b, fp32 when interpreting bf16. PRECISION: tl.dot's input_precision; None leaves
    Triton's default (tf32 for fp32 operands on NVIDIA, unless TRITON_F32_DEFAULT says otherwise)."""
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PRECISION is None:
        out = tl.dot(a, b, acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def cast(v, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 v -> dtype, rounding to nearest even as GPUs and torch's .to() do; by hand in integer
    ops when interpreting bf16 (the interpreter's own cast truncates)."""
    if INTERPRET_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round the low 16 bits half to even (finite values)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP_M: tl.constexpr):
    """(row block, col block) of program `pid`, walking GROUP_M row blocks per column block so the
    column operand's tiles are reused from L2 (the ordering of Triton's matmul tutorial)."""
    width = GROUP_M * num_cols
    first = (pid // width) * GROUP_M
    size = tl.minimum(num_rows - first, GROUP_M)
    return first + (pid % width) % size, (pid % width) // size
