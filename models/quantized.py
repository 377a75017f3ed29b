"""Frozen linears with quantized weights (NF4 / int4 / int8): the QLoRA base layer.

Only packed codes and scales are stored (NF4: 4.5 bits per weight, 0.28x of bf16); `.dequantize()`
gives the dense (out, in) weight, and forward runs x W'^T through `kernels.quant_matmul`, which
dequantizes inside the GEMM on GPU. LoRA / DoRA wrap these layers like any linear.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import nn

from peftcore.kernels import gguf_blocks, quant

from .layers import Conv1D

METHODS = ("nf4", "int4", "int8")
# llama.cpp's block formats, kept as a GGUF file holds them (load_pretrained(x.gguf, quantize="keep"))
BLOCK_METHODS = tuple(gguf_blocks.KEPT.values())  # q4_0, q4_1, q8_0, q5_0, q5_1, q4_k, q5_k, q6_k
GGML_TYPE_OF = {method: ggml_type for ggml_type, method in gguf_blocks.KEPT.items()}
DEFAULT_GROUP_SIZE = 128
SKIP_BY_DEFAULT = ("lm_head", "score", "classifier")  # heads stay dense, as in QLoRA / bitsandbytes

log = logging.getLogger(__name__)


def default_group_size(in_features: int) -> int:
    """The largest power of two <= DEFAULT_GROUP_SIZE that divides in_features: 128 does not divide
    SmolLM2's 576-wide layers, 64 does. Said once per width, as the user did not choose it."""
    group = DEFAULT_GROUP_SIZE
    while group > 2 and in_features % group:
        group //= 2
    if group != DEFAULT_GROUP_SIZE:
        announce_group_size(in_features, group)
    return group


@functools.lru_cache(maxsize=None)
def announce_group_size(in_features: int, group: int) -> None:
    log.info(f"int4: group size {group} for {in_features}-wide layers ({DEFAULT_GROUP_SIZE} does not divide "
             f"{in_features}; set group_size to choose another)")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, method: str, bias: bool = False,
                 group_size: int | None = None, double_quant: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if method not in METHODS + BLOCK_METHODS:
            raise ValueError(f"quantize={method!r} is not supported; supported: {', '.join(METHODS)} "
                             "(and 'keep' for a GGUF file's own blocks)")
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.group_size = (group_size or default_group_size(in_features)) if method == "int4" else None
        self.double_quant = double_quant
        # GPT-2's Conv1D stores (in, out): its QuantLinear holds the (out, in) transpose like every
        # other, and a dense copy (merge, save) goes back to a Conv1D so checkpoints keep their layout
        self.conv1d_layout = False
        self.compute_dtype = dtype  # what dequantize() and forward produce when inputs do not say
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        if method == "int4":
            quant.check_groups(in_features, self.group_size)

    @classmethod
    def from_linear(cls, linear: nn.Module, method: str, group_size: int | None = None,
                    double_quant: bool = False) -> "QuantLinear":
        """An nn.Linear, or a GPT-2 Conv1D (its (in, out) weight quantized as the (out, in) transpose), quantized."""
        conv1d = isinstance(linear, Conv1D)
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, method, linear.bias is not None, group_size, double_quant,
                    w.dtype, w.device)
        layer.conv1d_layout = conv1d
        layer.load_dense_weight(w.T if conv1d else w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    # -- storage --------------------------------------------------------------------------------
    def load_dense_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense (out, in) weight into this layer's buffers; the dense copy is not kept."""
        self.compute_dtype = weight.dtype if weight.is_floating_point() else self.compute_dtype
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} linear")
        if self.method in BLOCK_METHODS:
            raise ValueError(f"{self.method} weights come from a GGUF file as they are (quantize='keep'); "
                             "peftcore does not quantize dense weights into llama.cpp blocks")
        if self.method == "nf4":
            q = quant.nf4_quantize(weight, self.double_quant)
            fields = dict(packed=q.packed, absmax=q.absmax, absmax_scale=q.absmax_scale, absmax_offset=q.absmax_offset)
        elif self.method == "int4":
            q = quant.int4_quantize(weight, self.group_size)
            fields = dict(packed=q.packed, scale=q.scale, zero=q.zero)
        else:
            q = quant.int8_quantize(weight)
            fields = dict(q=q.q, scale=q.scale)
        for name, tensor in fields.items():
            self.register_buffer(name, tensor if tensor is None else tensor.contiguous())

    def load_block_weight(self, w: gguf_blocks.BlockWeight) -> None:
        """Keep a GGUF tensor's blocks (gguf_blocks.from_gguf_bytes) exactly: no re-quantization."""
        if GGML_TYPE_OF[self.method] != w.ggml_type or w.shape != (self.out_features, self.in_features):
            raise ValueError(f"a {self.method} {self.out_features}x{self.in_features} layer cannot hold "
                             f"GGML type {w.ggml_type} blocks of shape {w.shape}")
        for name, tensor in (("qs", w.qs), ("d", w.d), ("m", w.m)):
            self.register_buffer(name, tensor)

    @property
    def qweight(self):
        if self.method in BLOCK_METHODS:
            return gguf_blocks.BlockWeight(self.qs, self.d, self.m, GGML_TYPE_OF[self.method],
                                           (self.out_features, self.in_features))
        if self.method == "nf4":
            return quant.NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.absmax_scale,
                                   self.absmax_offset)
        if self.method == "int4":
            return quant.Int4Weight(self.packed, self.scale, self.zero, self.group_size)
        return quant.Int8Weight(self.q, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with."""
        dtype = dtype or self.compute_dtype
        if self.method in BLOCK_METHODS:
            return gguf_blocks.dequantize(self.qweight, dtype)
        if self.method == "nf4":
            return quant.nf4_dequantize(self.qweight, dtype)
        if self.method == "int4":
            return quant.int4_dequantize(self.qweight, dtype)
        return quant.int8_dequantize(self.qweight, dtype)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the scales: quantized buffers follow the device, keep their dtype.
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # .to(bf16) / .half() change it
        return self

    # -- compute --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peftcore.kernels import quant_matmul  # the module: tests reload it under TRITON_INTERPRET=1

        # int8 has no kernel: quant_matmul dequantizes and lets cuBLAS / MKL run the GEMM, inside an
        # autograd Function that dequantizes again for dX instead of keeping the dense weight
        # (a plain F.linear would save it for backward: one dense copy per layer during training).
        return quant_matmul.quant_matmul(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{extra}, "
                f"bias={self.bias is not None}")


def quantizable(name: str, module: nn.Module, skip: tuple[str, ...]) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] not in skip


def quantize_model(model: nn.Module, method: str = "nf4", group_size: int | None = None,
                   double_quant: bool = False, skip: tuple[str, ...] = SKIP_BY_DEFAULT,
                   keep_dense: Callable[[str], bool] | None = None) -> nn.Module:
    """Swap every nn.Linear and GPT-2 Conv1D (but the heads in `skip`, and the names `keep_dense` picks) for a
    QuantLinear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if quantizable(name, module, skip) and not (keep_dense and keep_dense(name)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantLinear.from_linear(module, method, group_size, double_quant))
    return model


def quantization_report(model: nn.Module) -> dict:
    """Bytes of the quantized layers vs the same weights in bf16."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = sum(m.storage_bytes() for m in layers)
    dense_bf16 = sum(2 * m.in_features * m.out_features for m in layers)
    return {"layers": len(layers), "bytes": stored, "bf16_bytes": dense_bf16,
            "ratio_to_bf16": stored / max(dense_bf16, 1)}
