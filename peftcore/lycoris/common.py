"""What LoHa and LoKr layers share, as plain functions on the layer (no base class): the per-adapter
bookkeeping under PEFT's attribute names, PEFT's initialisation path, the forward with module / rank dropout,
mixed-adapter batches, merging, deleting.

A layer using these has `base_layer`, PEFT's dicts (`r`, `alpha`, `scaling`, `rank_dropout`,
`rank_dropout_scale`, `module_dropout`), its ParameterDicts listed in `PARAM_DICTS`, and a method
`weight_delta(name, rank_dropout: bool)` that returns delta W in the base weight's shape.

Both methods compute an additive delta W and run the input through it as the base layer would (linear or conv
with the base's stride / padding / dilation / groups), so merging adds exactly what the forward adds.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.lora.layer import adapter_dtype, base_output_stands, is_conv1d, mixed_rows

SUPPORTED_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # HF PEFT 0.21.2's LyCORIS layers_mapping


def check_base(module: nn.Module, name: str, method: str) -> None:
    """Raise (one line) unless `module` is a layer PEFT's LyCORIS tuners adapt: nn.Linear / Conv1d / Conv2d."""
    kind = type(module).__name__
    if is_conv1d(module):
        raise TypeError(f"target {name!r} is GPT-2's Conv1D, which {method} does not adapt (neither does HF PEFT's: "
                        "only nn.Linear, nn.Conv1d and nn.Conv2d); use LoRA there, or leave it out of target_modules")
    if not isinstance(module, SUPPORTED_BASES):
        raise TypeError(f"target {name!r} is a {kind}; {method} adapts nn.Linear, nn.Conv1d and nn.Conv2d only "
                        "(as HF PEFT): leave it out of target_modules")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        raise ValueError(f"target {name!r} pads with padding_mode={module.padding_mode!r}; {method}'s delta runs "
                         "F.conv with zero padding (as HF PEFT), so merged and unmerged outputs would differ: "
                         "only padding_mode='zeros' convolutions are adapted")


def init_lycoris_state(layer: nn.Module, base_layer: nn.Module) -> None:
    """`base_layer` first (PEFT registers it first, so state_dict orders as PEFT's), then PEFT's dicts."""
    layer.base_layer = base_layer
    layer.r: dict[str, int] = {}
    layer.alpha: dict[str, float] = {}
    layer.scaling: dict[str, float] = {}
    layer.rank_dropout: dict[str, float] = {}
    layer.rank_dropout_scale: dict[str, bool] = {}
    layer.module_dropout: dict[str, float] = {}
    layer.active_adapters: list[str] = []
    layer.merged_adapters: list[str] = []
    layer.disable_adapters = False
    if isinstance(base_layer, nn.Linear):
        layer.in_features, layer.out_features = base_layer.in_features, base_layer.out_features
    else:
        layer.in_features, layer.out_features = base_layer.in_channels, base_layer.out_channels


def record_adapter(layer: nn.Module, name: str, r: int, alpha: float, config) -> None:
    """PEFT's per-adapter scalars (its update_layer): scaling = alpha / r."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (the rank), got {r!r}")
    layer.r[name], layer.alpha[name], layer.scaling[name] = r, alpha, alpha / r
    layer.rank_dropout[name], layer.module_dropout[name] = config.rank_dropout, config.module_dropout
    layer.rank_dropout_scale[name] = getattr(config, "rank_dropout_scale", False)


def empty(*shape: int) -> torch.Tensor:
    """A float32 CPU tensor to initialise: PEFT draws its inits on the CPU in float32 and then moves them, so
    with the same seed we draw the same numbers on any device."""
    return torch.empty(*shape, dtype=torch.float32)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (kaiming uniform, a = sqrt(5)); PEFT's for every LyCORIS factor."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def place(layer: nn.Module, initialised: dict[str, torch.Tensor], name: str, autocast_dtype: bool) -> None:
    """Store each initialised tensor as `layer.<dict>[name]`, the way PEFT ends up with it: moved to the base
    weight's device and dtype (_move_adapter_to_device_of_base_layer), then upcast to float32 on a half-precision
    base (cast_adapter_dtype). The trip through the base dtype rounds the init as PEFT's does."""
    weight = layer.base_layer.weight
    base_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    dtype = adapter_dtype(weight.dtype, autocast_dtype)
    for attribute, tensor in initialised.items():
        value = tensor.to(weight.device, base_dtype).to(dtype)
        getattr(layer, attribute)[name] = nn.Parameter(value)


def known_adapters(layer: nn.Module) -> set[str]:
    return {name for attribute in layer.PARAM_DICTS for name in getattr(layer, attribute)}


def adapter_params(layer: nn.Module, name: str):
    for attribute in layer.PARAM_DICTS:
        container = getattr(layer, attribute)
        if name in container:
            yield container[name]


def delete_adapter(layer: nn.Module, name: str) -> None:
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
    for attribute in layer.PARAM_DICTS:
        container = getattr(layer, attribute)
        if name in container:
            del container[name]
    for scalars in (layer.r, layer.alpha, layer.scaling, layer.rank_dropout, layer.rank_dropout_scale,
                    layer.module_dropout):
        scalars.pop(name, None)
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def drop_rows(weight: torch.Tensor, p: float, rescale: bool, mask_dtype: torch.dtype) -> torch.Tensor:
    """Rank dropout: zero each output row of delta W with probability p (one torch.rand on the CPU generator,
    as PEFT draws it, so a seeded run drops the same rows). rescale: divide by the kept fraction."""
    keep = (torch.rand(weight.size(0)) > p).to(mask_dtype)  # (out,)
    if rescale:
        keep = keep / keep.mean()
    keep = keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
    return (weight * keep).to(weight.dtype)


def run_delta(base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x through delta W as through the base layer, without the bias (base(x) carries it)."""
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
    return F.linear(x, delta)


def add_delta(layer: nn.Module, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """out + adapter `name`'s term, in the adapter's dtype (x is cast to it, as PEFT's _cast_input_dtype).

    Training: PEFT draws torch.rand(1) for module dropout on every call (also at p = 0), then rank dropout's
    mask inside the delta; the same draws in the same order keep a seeded run equal to PEFT's."""
    if layer.training and not torch.rand(1) > layer.module_dropout[name]:
        return out
    delta = layer.weight_delta(name, rank_dropout=layer.training and bool(layer.rank_dropout[name]))
    return out + run_delta(layer.base_layer, x.to(delta.dtype), delta)


def lycoris_forward(layer: nn.Module, x: torch.Tensor, adapter_names: list[str] | None) -> torch.Tensor:
    """base(x) plus every active adapter's term (summed, as PEFT's layer loops over active_adapters), or one
    adapter per batch row (adapter_names; "__base__": none); merged or disabled: base(x) alone. The result takes
    x's dtype, as PEFT casts back to the input's."""
    out = layer.base_layer(x)
    if base_output_stands(layer, adapter_names):
        return out
    known = known_adapters(layer)
    if adapter_names is not None:
        return mixed_rows(out, x, adapter_names, known, lambda o, xs, n: add_delta(layer, o, xs, n)).to(x.dtype)
    for name in layer.active_adapters:
        if name in known:
            out = add_delta(layer, out, x, name)
    return out.to(x.dtype)


def merge(layer: nn.Module, names: list[str] | None) -> None:
    """W += delta W for each named adapter (default: the active ones), in place, no dropout (PEFT's merge)."""
    known = known_adapters(layer)
    weight = layer.base_layer.weight
    for name in names or layer.active_adapters:
        if name in layer.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
            warnings.warn(f"adapter {name!r} is already merged into {type(layer.base_layer).__name__}: nothing to do")
            continue
        if name not in known:
            continue
        # added in the wider dtype and rounded once into W, as PEFT's in-place `weight.data += delta`
        weight.data += layer.delta_weight(name).detach()
        layer.merged_adapters.append(name)


def unmerge(layer: nn.Module) -> None:
    """W -= delta W for every merged adapter, last merged first."""
    weight = layer.base_layer.weight
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        weight.data -= layer.delta_weight(name).detach()
