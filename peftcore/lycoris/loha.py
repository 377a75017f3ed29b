"""LoHa (low-rank Hadamard product, FedPara arXiv 2108.06098) around an nn.Linear, nn.Conv1d or nn.Conv2d.

    delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r          (* elementwise; each product has rank <= r)
    y       = base(x) + x delta W^T                              (a conv runs x through delta W as the base does)

Conv layers flatten the kernel into the input side, W (out, in/groups * k...), unless use_effective_conv2d (and
kernel > 1): then each factor is a CP (Tucker-2) decomposition, rebuild_i = t_i x_0 w_ia^T x_1 w_ib^T,
(out, in/groups, kh, kw). Parameter names and nesting are PEFT's (`hada_w1_a.<adapter>`, ..., `hada_t1`),
so state dicts and adapter files line up key for key.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftcore.lycoris import common
from peftcore.lycoris.config import LoHaConfig


def loha_shape(base: nn.Module, use_effective_conv2d: bool) -> tuple[tuple[int, ...], bool]:
    """(the shape LoHa factorises, whether the CP form is used), as PEFT's update_layer: a kernel of size 1 is a
    matrix product, so it never takes the CP form."""
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape), False  # (out, in)
    kernel = tuple(base.kernel_size)
    in_channels = base.in_channels // base.groups
    effective = use_effective_conv2d and any(k != 1 for k in kernel)
    if effective:
        return (base.out_channels, in_channels, *kernel), True
    return (base.out_channels, in_channels * math.prod(kernel)), False


def loha_tensors(r: int, shape: tuple[int, ...], effective: bool, init_weights: bool) -> dict[str, torch.Tensor]:
    """The initialised factors, drawn in PEFT's order (w1_a, w1_b, w2_a, w2_b, then t1, t2), so a seeded
    init equals PEFT's. init_weights=True zeroes hada_w2_b: delta W = 0, the adapter starts as the identity."""
    out_dim, in_dim = shape[0], shape[1]
    if effective:
        # CP form: the factors are (r, out) and (r, in), "mode" matrices; the kernel lives in t (r, r, kh, kw);
        # a Conv1d kernel (k,) is stored as (k, 1), PEFT's layout
        kernel = (*shape[2:], 1) if len(shape) == 3 else shape[2:]
        t = {"w1_a": (r, out_dim), "w1_b": (r, in_dim), "w2_a": (r, out_dim), "w2_b": (r, in_dim)}
    else:
        t = {"w1_a": (out_dim, r), "w1_b": (r, in_dim), "w2_a": (out_dim, r), "w2_b": (r, in_dim)}
    tensors = {f"hada_{key}": common.empty(*size) for key, size in t.items()}
    for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
        common.kaiming_(tensors[key])
    if init_weights:
        nn.init.zeros_(tensors["hada_w2_b"])
    else:
        common.kaiming_(tensors["hada_w2_b"])
    if effective:
        tensors["hada_t1"] = common.kaiming_(common.empty(r, r, *kernel))
        tensors["hada_t2"] = common.kaiming_(common.empty(r, r, *kernel))
    return tensors


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw): t's two rank modes mapped to out and in."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


class LoHaLayer(nn.Module):
    """LoHa adapters (one or several, by name) around an nn.Linear, nn.Conv1d or nn.Conv2d."""

    PARAM_DICTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")  # PEFT's order
    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: the insides are no targets of their own

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        common.init_lycoris_state(self, base_layer)
        for attribute in self.PARAM_DICTS:
            setattr(self, attribute, nn.ParameterDict())

    def add_adapter(self, name: str, config: LoHaConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        """`autocast_dtype`: float32 factors on a half-precision base (lora.layer.adapter_dtype), as PEFT."""
        common.record_adapter(self, name, r, alpha, config)
        shape, effective = loha_shape(self.base_layer, config.use_effective_conv2d)
        common.place(self, loha_tensors(r, shape, effective, config.init_weights), name, autocast_dtype)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        common.delete_adapter(self, name)

    def adapter_params(self, name: str):
        yield from common.adapter_params(self, name)

    def weight_delta(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """delta W in the base weight's shape; rank_dropout (training): PEFT's row mask, always rescaled."""
        w1a, w1b = self.hada_w1_a[name], self.hada_w1_b[name]
        w2a, w2b = self.hada_w2_a[name], self.hada_w2_b[name]
        if name in self.hada_t1:
            delta = cp_rebuild(self.hada_t1[name], w1a, w1b) * cp_rebuild(self.hada_t2[name], w2a, w2b)
        else:
            delta = (w1a @ w1b) * (w2a @ w2b)  # (out, in) * (out, in)
        delta = (delta * self.scaling[name]).reshape(self.base_layer.weight.shape)
        if rank_dropout:
            delta = common.drop_rows(delta, self.rank_dropout[name], rescale=True, mask_dtype=delta.dtype)
        return delta

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter `name` adds to the base weight (no dropout), in the base weight's shape."""
        return self.weight_delta(name)

    def check_mergeable(self, names: list[str]) -> None:
        """A dense Linear / Conv weight (the only bases LoHa takes) always takes the delta."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        common.merge(self, adapter_names)

    def unmerge(self) -> None:
        common.unmerge(self)

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return common.lycoris_forward(self, x, adapter_names)
