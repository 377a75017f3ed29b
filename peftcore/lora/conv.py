"""LoRA / DoRA on nn.Conv1d / Conv2d / Conv3d, laid out as HF PEFT's lora.Conv1d/2d/3d (0.21.2), so conv
adapters move between the two libraries key for key and give the same outputs.

  lora_A: a conv of the base's kind, in_channels -> r, with the base's kernel size, stride and padding
  lora_B: a 1x1 conv r -> out_channels with the base's groups (so r must be a multiple of groups, as in PEFT)
  y = base(x) + s * B(A(dropout(x)))

B after A is the conv whose weight is s * B.flatten(1) @ A.flatten(1), shaped (out, in, *kernel). With
groups == 1 that is the base weight's layout, so it merges. With groups > 1 A reads every input channel, so
the adapter is a dense conv that no grouped (out, in/groups, *kernel) weight can hold: merging is refused, as
in PEFT, and `dense_delta` gives the adapter as that dense weight (what peftcore.analysis measures).

lora_A also takes the base's dilation and padding_mode, which PEFT leaves at 1 and "zeros": there a dilated
base fails with a shape mismatch, and a reflect-padded one runs a function its own merge does not produce.
Where PEFT runs and merges consistently (dilation 1, zero padding), the two agree exactly.

DoRA (PEFT's _DoraConvNdLayer): the magnitude has PEFT's shape (1, out, 1, ...), one entry per output
channel; the norm of W + s*dW runs over every dim but the output channel and is detached (DoRA paper §4.3).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from peftcore.config import LoraConfig
from peftcore.lora.init import PLAIN_INITS, init_adapter
from peftcore.lora.layer import (
    Magnitude,
    adapter_dtype,
    add_lora_biases,
    apply_adapters,
    check_bias_mergeable,
    delete_from,
    init_adapter_state,
    lora_scaling,
    merge_weights,
    unmerge_weights,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_norm(W: torch.Tensor, lora_weight: torch.Tensor, s: float) -> torch.Tensor:
    """||W + s * lora_weight|| over every dim but the output channel, as (1, out, 1, ...) (PEFT's magnitude
    shape), accumulated in at least fp32: the sum of squares over in * kernel terms is never narrowed."""
    acc = torch.promote_types(torch.promote_types(W.dtype, lora_weight.dtype), torch.float32)
    norm = torch.linalg.vector_norm((W.to(acc) + s * lora_weight.to(acc)).flatten(1), dim=1)
    return norm.view(1, -1, *[1] * (W.dim() - 2))


class LoraConv(nn.Module):
    """LoRA / DoRA around an nn.Conv1d, nn.Conv2d or nn.Conv3d."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels  # PEFT's names
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        init_adapter_state(self)

    @property
    def fan_in_fan_out(self) -> bool:
        return False  # a conv weight is (out, in, *kernel): out first, as nn.Linear's

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        base = self.base_layer
        check_adapter(base, config, r)
        kind = CONV_TYPES[base.weight.dim() - 3]  # the plain torch conv: a subclass's constructor may differ
        kw = dict(device=base.weight.device, dtype=adapter_dtype(base.weight.dtype, autocast_dtype))
        self.lora_A[name] = kind(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                 bias=False, padding_mode=base.padding_mode, **kw)
        self.lora_B[name] = kind(r, base.out_channels, 1, groups=base.groups, bias=config.lora_bias, **kw)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, config.use_rslora)
        init_adapter(self, name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                norm = conv_norm(base.weight, self.dora_lora_weight(name), self.scaling[name])
            self.lora_magnitude_vector[name] = Magnitude(norm.to(kw["dtype"]))
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_from(self, name, (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector))

    def adapter_params(self, name: str):
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in container:
                yield from container[name].parameters()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return apply_adapters(self, self.base_layer(x), x, adapter_names, self.lora_A)

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + this adapter's term, in the wider of the two dtypes (apply_adapters casts back once)."""
        A, B = self.lora_A[name], self.lora_B[name]
        x_lora = self.lora_dropout[name](x.to(A.weight.dtype))
        if name in self.lora_magnitude_vector:
            return out + self.dora_delta(x_lora, out, name)
        return out + B(A(x_lora)) * self.scaling[name]

    def dora_delta(self, x_lora: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """What DoRA adds to base(x): (mag - 1) * (W * x) + mag * s * B(A(x)), mag = m / ||W + s dW|| per channel."""
        base, s = self.base_layer, self.scaling[name]
        norm = conv_norm(base.weight, self.dora_lora_weight(name).detach(), s).detach()
        mag = self.lora_magnitude_vector[name].weight / norm
        # PEFT's test: whether dropout ran (then the base conv is re-run on the dropped input, without bias)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            base_no_bias = out if base.bias is None else out - base.bias.view(1, -1, *[1] * (out.dim() - 2))
        else:
            base_no_bias = base._conv_forward(x_lora, base.weight.to(x_lora.dtype), None)
        lora = self.lora_B[name](self.lora_A[name](x_lora)) * s
        return (mag - 1) * base_no_bias + mag * lora

    def dora_lora_weight(self, name: str) -> torch.Tensor:
        """B A as PEFT's DoRA norm takes it: B.view(-1, r) @ A.view(r, -1) in the base weight's shape. With
        groups == 1 that is dW / s; with groups > 1 it is not the adapter's weight (that is dense, see the module
        docstring) but PEFT's definition of the norm, kept so that grouped DoRA adapters give PEFT's outputs."""
        r, W = self.r[name], self.base_layer.weight
        return (self.lora_B[name].weight.reshape(-1, r) @ self.lora_A[name].weight.reshape(r, -1)).reshape(W.shape)

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def dense_delta(self, name: str) -> torch.Tensor:
        """The adapter as one dense (groups=1) conv weight (out, in, *kernel): s * B A, B expanded from its
        (out, r / groups) grouped weight to the block-diagonal (out, r) matrix it stands for."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dense_B = grouped_to_dense(B.flatten(1), self.base_layer.groups)
        return (dense_B @ A.flatten(1)).view(self.out_features, *A.shape[1:]) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the base weight's layout (out, in, *kernel), as PEFT's get_delta_weight; groups == 1 only."""
        if self.base_layer.groups > 1:
            raise NotImplementedError(unmergeable(self.base_layer))
        return self.dense_delta(name)

    def dora_norm(self, W: torch.Tensor, name: str) -> torch.Tensor:
        """||W + dW|| per output channel, W in the base weight's layout (PEFT's merge norm)."""
        return conv_norm(W, self.delta_weight(name), 1.0)

    def dora_factor(self, name: str) -> torch.Tensor:
        """m / ||W + s dW||, shaped (out, 1, ...) to scale the stored weight per output channel."""
        factor = self.lora_magnitude_vector[name].weight.detach() / self._merge_norms[name]
        return factor.view(-1, *[1] * (self.base_layer.weight.dim() - 1))

    def check_mergeable(self, names: list[str]) -> None:
        """Raise before anything is merged (PeftModel checks every layer first: no half-merged model)."""
        if self.base_layer.groups > 1 and any(n in self.lora_A and n not in self.merged_adapters for n in names):
            raise NotImplementedError(unmergeable(self.base_layer))  # PEFT raises NotImplementedError too
        check_bias_mergeable(self, names)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        self.check_mergeable(names)
        add_lora_biases(self, merge_weights(self, names, self.lora_A), 1)

    def unmerge(self) -> None:
        add_lora_biases(self, unmerge_weights(self), -1)



def grouped_to_dense(B: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped 1x1 conv's (out, r / g) weight -> the (out, r) matrix it applies: the j-th block of out / g
    output channels reads only the j-th r / g of A's channels, so the matrix is block-diagonal."""
    if groups <= 1:
        return B
    per_out = B.shape[0] // groups
    return torch.block_diag(*(B[j * per_out:(j + 1) * per_out] for j in range(groups)))


def unmergeable(base: nn.Module) -> str:
    return (f"cannot merge LoRA into a {type(base).__name__} with groups={base.groups}: lora_A reads every input "
            "channel, so the adapter is a dense conv that the grouped base weight cannot hold (HF PEFT refuses too); "
            "use the adapter unmerged")


def check_adapter(base: nn.Module, config: LoraConfig, r: int) -> None:
    """PEFT's limits on conv adapters, raised before any weight is made; PEFT's warning for grouped convs."""
    if r % base.groups:
        raise ValueError(f"r={r} on a {type(base).__name__} with groups={base.groups}: lora_B is grouped like the "
                         f"base, so r must be a multiple of {base.groups} (as in HF PEFT); set rank_pattern for this "
                         "layer or leave it out of target_modules")
    if config.init_lora_weights not in PLAIN_INITS:  # PiSSA / OLoRA / LoftQ factor a 2-D weight, not a kernel
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not defined for conv layers (it factors "
                         f"a 2-D weight); a {type(base).__name__} takes True, False or 'gaussian'")
    if base.groups > 1:
        warnings.warn(f"LoRA on a {type(base).__name__} with groups={base.groups}: it runs, but cannot be merged")
