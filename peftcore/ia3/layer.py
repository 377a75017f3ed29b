"""(IA)^3 layers, written by hand around the layer they adapt (the base-layer pattern).

IA3Linear: y = l * base(x)        (output features scaled), or, for a feedforward module,
           y = base(l * x)        (input features scaled, the paper's FFN rescaling)
IA3Conv:   the same per channel, for nn.Conv2d / nn.Conv3d.

One learned vector `l` per adapter (PEFT's `ia3_l.<name>`: (out, 1) for an output vector, (1, in) for an
input one; (1, C, 1, 1[, 1]) on a convolution). Several active adapters multiply their vectors. Merging
multiplies the base weight (and, for output vectors, the bias) by `l`; unmerging divides it out again, by
l + 1e-8 as PEFT does, so a zero entry does not divide by zero. Parameter names and nesting equal HF PEFT's,
so state dicts line up key for key.
"""
from __future__ import annotations

import warnings
from functools import reduce

import torch
from torch import nn

from peftcore.lora.layer import adapter_dtype, base_output_stands, is_conv1d, linear_features
from peftcore.models.quantized import QuantLinear

UNMERGE_EPS = 1e-8  # PEFT's tolerance against a zero entry when dividing a merged vector out
CONV_TYPES = (nn.Conv2d, nn.Conv3d)  # as PEFT's IA3: nn.Conv1d has no IA3 layer there


def base_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device a new vector follows: the weight's, or a quantized layer's compute dtype."""
    if isinstance(base, QuantLinear):
        tensor = next(iter([*base.buffers(), *base.parameters()]), None)
        return base.compute_dtype, tensor.device if tensor is not None else torch.device("cpu")
    return base.weight.dtype, base.weight.device


def new_vector(shape: tuple[int, ...], init_ones: bool, base: nn.Module, autocast: bool) -> nn.Parameter:
    """PEFT's update_layer: draw N(0, 1) in fp32, then set it to ones when init_ia3_weights (the draw happens
    either way, so a seeded run consumes the random stream as PEFT's does), then move it to the base's
    device in adapter_dtype (float32 on a half-precision base with autocast, as PEFT's cast_adapter_dtype)."""
    weight = torch.randn(shape)
    if init_ones:
        nn.init.constant_(weight, 1.0)
    dtype, device = base_dtype_device(base)
    return nn.Parameter(weight.to(device=device, dtype=adapter_dtype(dtype, autocast)))


def init_ia3_state(layer: nn.Module, base_layer: nn.Module, is_feedforward: bool) -> None:
    """The bookkeeping every (IA)^3 layer keeps, under PEFT's names (the backend drives these)."""
    layer.base_layer = base_layer
    layer.ia3_l = nn.ParameterDict()
    layer.is_feedforward = is_feedforward  # fixed when the layer is made: PEFT's later adapters follow it too
    layer.active_adapters: list[str] = []
    layer.merged_adapters: list[str] = []
    layer.disable_adapters = False


def delete_adapter(layer: nn.Module, name: str) -> None:
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
    if name in layer.ia3_l:
        del layer.ia3_l[name]
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def combined_vector(layer: nn.Module, names: list[str]) -> torch.Tensor | None:
    """The product of the named adapters' vectors, flattened to (features,), in their promoted dtype (PEFT's
    forward multiplies the active vectors); None if this layer holds none of them."""
    vectors = [layer.ia3_l[n].flatten() for n in names if n in layer.ia3_l]
    return reduce(torch.mul, vectors) if vectors else None


def row_vectors(layer: nn.Module, adapter_names: list[str], batch: int) -> torch.Tensor | None:
    """(batch, features): row b holds adapter adapter_names[b]'s vector, ones for "__base__" or an adapter this
    layer lacks; None when no row has an adapter here (the base alone). One vector per row, so the whole
    batch runs through the base once and every row computes what its adapter alone computes."""
    if len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch}")
    present = [n for n in adapter_names if n in layer.ia3_l]
    if not present:
        return None
    dtype = reduce(torch.promote_types, (layer.ia3_l[n].dtype for n in present))
    some = layer.ia3_l[present[0]]
    ones = torch.ones(some.numel(), dtype=dtype, device=some.device)
    return torch.stack([layer.ia3_l[n].flatten().to(dtype) if n in layer.ia3_l else ones for n in adapter_names])


def vector_params(layer: nn.Module, name: str):
    if name in layer.ia3_l:
        yield layer.ia3_l[name]


def multiplicative_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """What merging `name` now adds to the stored weight: W * (l - 1), in W's layout and dtype (multiplicative:
    relative to the weight as it is, with any adapters merged before; layer.weight_scale shapes l)."""
    W = layer.base_layer.weight.detach()
    return (W * (layer.weight_scale(name) - 1)).to(W.dtype)


def pending_merges(layer: nn.Module, adapter_names: list[str] | None) -> list[str]:
    """PEFT's check_adapters_to_merge: the named (default: active) adapters this layer holds and has not merged;
    an already merged one is skipped with a warning."""
    names = adapter_names or layer.active_adapters
    for name in names:
        if name in layer.merged_adapters:
            warnings.warn(f"adapter {name!r} is already merged into {type(layer.base_layer).__name__}: nothing to do")
    return [n for n in names if n in layer.ia3_l and n not in layer.merged_adapters]


def scale_bias(layer: nn.Module, name: str, sign: int) -> None:
    """Output vectors scale the bias too (sign 1: times l, -1: divided by l + eps); input vectors leave it."""
    bias = getattr(layer.base_layer, "bias", None)
    if layer.is_feedforward or bias is None:
        return
    l_ = layer.ia3_l[name].detach().reshape(bias.shape)  # (out,)
    bias.data.copy_(bias.data * l_ if sign > 0 else bias.data / (l_ + UNMERGE_EPS))


def merge_into(layer: nn.Module, adapter_names: list[str] | None) -> None:
    """W <- W * l (in the stored layout, layer.weight_scale), bias <- bias * l for output vectors; one adapter
    after the other, each multiplying what the previous left (the product PEFT's forward computes)."""
    names = pending_merges(layer, adapter_names)
    layer.check_mergeable(names)
    W = layer.base_layer.weight
    for name in names:
        if (layer.ia3_l[name] == 0).any():
            warnings.warn(f"adapter {name!r} has zero entries: merging zeroes those rows / columns of "
                          f"{type(layer.base_layer).__name__}'s weight, which unmerge cannot restore")
        W.data.copy_(W.data * layer.weight_scale(name))  # in the promoted dtype, stored back in W's
        scale_bias(layer, name, 1)
        layer.merged_adapters.append(name)


def unmerge_from(layer: nn.Module) -> None:
    """Divide the merged vectors out again, last merged first (by l + 1e-8, as PEFT). Nothing merged: nothing to
    do, silently (the backend unmerges every layer; PEFT's per-layer "Already unmerged" warning would repeat)."""
    while layer.merged_adapters:  # (a quantized base, which never merges, has no .weight to look at)
        name = layer.merged_adapters.pop()
        W = layer.base_layer.weight
        W.data.copy_(W.data / (layer.weight_scale(name) + UNMERGE_EPS))
        scale_bias(layer, name, -1)


class IA3Linear(nn.Module):
    """(IA)^3 around an nn.Linear, a GPT-2 Conv1D (ours or transformers'), or a QuantLinear (forward only)."""

    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: base_layer is no target of its own

    def __init__(self, base_layer: nn.Module, is_feedforward: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        init_ia3_state(self, base_layer, is_feedforward)

    @property
    def fan_in_fan_out(self) -> bool:
        """The base stores (in, out) (GPT-2's Conv1D): the merge scales its columns, not its rows."""
        return is_conv1d(self.base_layer)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config, autocast_dtype: bool = True) -> None:
        """A vector over the input features (feedforward) or the output ones; `config` is an IA3Config."""
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        self.ia3_l[name] = new_vector(shape, config.init_ia3_weights, self.base_layer, autocast_dtype)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_adapter(self, name)

    def adapter_params(self, name: str):
        return vector_params(self, name)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """As PEFT's ia3.Linear.forward: the input scaled in the vector's dtype and cast back to x's before the
        base runs, or the base's output scaled and cast back to its own dtype."""
        if base_output_stands(self, adapter_names):
            return self.base_layer(x)
        scale = self.scale_for(x, adapter_names)
        if scale is None:
            return self.base_layer(x)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    def scale_for(self, x: torch.Tensor, adapter_names) -> torch.Tensor | None:
        """What multiplies x's (feedforward) or the output's last dim: (features,) for the active adapters, or
        (batch, 1, ..., features) with one vector per row for a mixed batch."""
        if adapter_names is None:
            return combined_vector(self, self.active_adapters)
        rows = row_vectors(self, adapter_names, x.shape[0])  # (B, features)
        return None if rows is None else rows.view(rows.shape[0], *[1] * (x.dim() - 2), rows.shape[1])

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to multiply the stored weight: (out, 1) / (1, in) on an (out, in) weight, transposed
        on Conv1D's (in, out) one (PEFT's transpose(ia3_l, fan_in_fan_out))."""
        l_ = self.ia3_l[name].detach()
        return l_.T if self.fan_in_fan_out else l_

    def delta_weight(self, name: str) -> torch.Tensor:
        return multiplicative_delta(self, name)

    def check_mergeable(self, names: list[str]) -> None:
        """A quantized base cannot be scaled in place (PEFT refuses 4-bit / 8-bit IA3 merges too)."""
        if isinstance(self.base_layer, QuantLinear):
            raise TypeError("cannot merge (IA)^3 into a quantized base layer; use the adapter unmerged")

    def merge(self, adapter_names: list[str] | None = None) -> None:
        merge_into(self, adapter_names)

    def unmerge(self) -> None:
        unmerge_from(self)


class IA3Conv(nn.Module):
    """(IA)^3 around an nn.Conv2d / nn.Conv3d: one factor per output channel, or per input channel (feedforward)."""

    is_adapter_wrapper = True

    def __init__(self, base_layer: nn.Module, is_feedforward: bool = False):
        super().__init__()
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels  # PEFT's names
        self.kernel_dim = base_layer.weight.dim()  # 4 for Conv2d, 5 for Conv3d
        init_ia3_state(self, base_layer, is_feedforward)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config, autocast_dtype: bool = True) -> None:
        channels = self.in_features if self.is_feedforward else self.out_features
        shape = (1, channels) + (1,) * (self.kernel_dim - 2)  # (1, C, 1, 1[, 1]), PEFT's shape
        self.ia3_l[name] = new_vector(shape, config.init_ia3_weights, self.base_layer, autocast_dtype)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_adapter(self, name)

    def adapter_params(self, name: str):
        return vector_params(self, name)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """As PEFT's ia3._ConvNd.forward: the scaled input goes to the base weight's dtype; a scaled output
        is taken in the vector's dtype; the result comes back in x's dtype."""
        if base_output_stands(self, adapter_names):
            return self.base_layer(x)
        scale = self.scale_for(x, adapter_names)
        if scale is None:
            return self.base_layer(x)
        if self.is_feedforward:
            out = self.base_layer((x.to(scale.dtype) * scale).to(self.base_layer.weight.dtype))
        else:
            out = self.base_layer(x).to(scale.dtype) * scale
        return out.to(x.dtype)

    def scale_for(self, x: torch.Tensor, adapter_names) -> torch.Tensor | None:
        """(C, 1, 1[, 1]) for the active adapters, (batch, C, 1, 1[, 1]) for a mixed batch: the channel dim."""
        spatial = [1] * (self.kernel_dim - 2)
        if adapter_names is None:
            vector = combined_vector(self, self.active_adapters)
            return None if vector is None else vector.view(-1, *spatial)
        rows = row_vectors(self, adapter_names, x.shape[0])  # (B, C)
        return None if rows is None else rows.view(*rows.shape, *spatial)

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped like the weight (out, in / groups, k...): per output row, or per input channel,
        repeated over each group's output channels (PEFT's _get_ia3_scaling_for_weight)."""
        l_ = self.ia3_l[name].detach().flatten()
        base, spatial = self.base_layer, [1] * (self.kernel_dim - 2)
        if not self.is_feedforward:
            return l_.view(-1, 1, *spatial)  # (out, 1, 1, 1)
        groups = base.groups
        in_per_group, out_per_group = base.in_channels // groups, base.out_channels // groups
        # input channel g * in_per_group + j feeds only group g's output channels: column j of their rows
        per_group = l_.view(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
        return per_group.reshape(base.out_channels, in_per_group, *spatial)

    def delta_weight(self, name: str) -> torch.Tensor:
        return multiplicative_delta(self, name)

    def check_mergeable(self, names: list[str]) -> None:
        """A convolution always takes its vectors."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        merge_into(self, adapter_names)

    def unmerge(self) -> None:
        unmerge_from(self)


IA3_LAYERS = (IA3Linear, IA3Conv)
