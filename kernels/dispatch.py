"""Which path a kernel call takes: Triton on CUDA, Triton's interpreter on CPU when asked, else torch.

TRITON_INTERPRET=1 must be set before the kernel modules are imported (Triton reads it when
`@triton.jit` decorates a function), so `interpreting()` is read once, at import.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every kernel module takes, on either path

try:  # triton is a Linux-only dependency; elsewhere every call takes the torch reference
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on non-Linux installs only
    HAS_TRITON = False


def interpreting() -> bool:
    return INTERPRET


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernels."""
    if not HAS_TRITON:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    return on_cuda or (INTERPRET and on_cpu)
