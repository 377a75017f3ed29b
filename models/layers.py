"""Layers more than one family uses."""
from __future__ import annotations

import torch
from torch import nn

from .fused import rms_norm


class Conv1D(nn.Module):
    """GPT-2's "Conv1D": a linear layer whose weight is stored (in, out), as in the HF checkpoints.

    Kept as its own type (not nn.Linear with a transpose at load time) so checkpoints and adapters
    keep transformers' shapes key for key; LoRA treats it with `fan_in_fan_out=True`.
    """

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf  # out_features, transformers' name
        self.weight = nn.Parameter(torch.empty(nx, nf))  # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like transformers (bf16 loses the small mean-square digits), scale after.
        # transformers' exact formula; on CPU it is also ~2x faster than torch.rms_norm, which
        # decomposes into more passes over x there. With autograd, a hand-written backward that
        # keeps x and the per-row rstd only (see fused.RMSNormFunction).
        return rms_norm(x, self.weight, self.eps)
