"""AdaLoRA's SVD-form layers, written by hand around the layer they adapt (the base-layer pattern).

    y = base(x) + (dropout(x) @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)

A (r, in) and B (out, r) play the singular vectors, E (r, 1) the singular values; the rank allocator
(adalora.allocator) zeroes entries of E to prune triplets, and the orthogonality penalty keeps A's rows and B's
columns near orthonormal. scaling is lora_alpha (r when alpha <= 0) and ranknum the rank the layer was made with:
PEFT keeps ranknum at init_r after pruning and after loading a pruned file, so the output does not jump when
triplets go. Names and nesting equal HF PEFT's (`lora_A.<name>`, `lora_E.<name>`, `ranknum.<name>`, all
ParameterDicts), so state dicts line up key for key.

AdaLoraLinear adapts nn.Linear, GPT-2's Conv1D and peftcore's QuantLinear (unmerged); AdaLoraConv2d an
nn.Conv2d, whose update B (A * E) (out, in * kh * kw) is reshaped to the kernel, as PEFT's SVDConv2d.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.lora.layer import adapter_dtype, apply_adapters, is_conv1d, linear_features
from peftcore.models.quantized import QuantLinear

RANKNUM_EPS = 1e-5  # PEFT's guard against a layer made with r = 0


def svd_scaling(lora_alpha: float, r: int) -> float:
    """PEFT's AdaLoRA scaling: lora_alpha, or the rank when lora_alpha <= 0 (the update is then divided by
    ranknum + eps: svd_product)."""
    return lora_alpha if lora_alpha > 0 else float(r)


def base_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    if isinstance(base, QuantLinear):
        return base.compute_dtype, next(base.buffers()).device
    return base.weight.dtype, base.weight.device


def as_adapter_tensor(t: torch.Tensor, base: nn.Module, autocast: bool) -> nn.Parameter:
    """PEFT moves a new adapter's tensors to the base weight's dtype first, then upcasts half precision to float32
    (autocast_adapter_dtype): an fp32 adapter on a bf16 base holds bf16-rounded init values. Kept for bit-equal
    same-seed init."""
    dtype, device = base_dtype_device(base)
    if dtype.is_floating_point:
        t = t.to(device, dtype)
    return nn.Parameter(t.to(device, adapter_dtype(dtype, autocast)))


def init_svd_state(layer: nn.Module, base_layer: nn.Module) -> None:
    """The bookkeeping every AdaLoRA layer keeps, registered in PEFT's order (state_dict lists keys as PEFT's)."""
    layer.base_layer = base_layer
    layer.lora_dropout = nn.ModuleDict()
    layer.lora_A = nn.ParameterDict()  # (r, in) per adapter
    layer.lora_B = nn.ParameterDict()  # (out, r)
    layer.lora_E = nn.ParameterDict()  # (r, 1): the singular values the allocator prunes
    layer.ranknum = nn.ParameterDict()  # (1,), frozen: the rank the adapter was made with
    layer.r: dict[str, int] = {}
    layer.lora_alpha: dict[str, float] = {}
    layer.scaling: dict[str, float] = {}
    layer.active_adapters: list[str] = []
    layer.merged_adapters: list[str] = []
    layer.disable_adapters = False


def add_svd_adapter(layer: nn.Module, name: str, config, r: int, a_columns: int, autocast: bool) -> None:
    """PEFT's AdaLoraLayer.update_layer: draw A, E, B, ranknum from the global RNG in PEFT's order, then (with
    init_lora_weights) E = 0 and A, B ~ N(0, 0.02), so a new adapter is the base (E = 0) yet trains (A, B != 0)."""
    if r < 0:
        raise ValueError(f"AdaLoRA rank must be >= 0, got {r}")
    A, E, B = torch.randn(r, a_columns), torch.randn(r, 1), torch.randn(layer.out_features, r)
    torch.randn(1)  # PEFT draws ranknum's placeholder before filling it: the stream stays in step
    if config.init_lora_weights:
        nn.init.zeros_(E)
        nn.init.normal_(A, mean=0.0, std=0.02)
        nn.init.normal_(B, mean=0.0, std=0.02)
    base = layer.base_layer
    layer.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
    layer.lora_A[name] = as_adapter_tensor(A, base, autocast)
    layer.lora_B[name] = as_adapter_tensor(B, base, autocast)
    layer.lora_E[name] = as_adapter_tensor(E, base, autocast)
    layer.ranknum[name] = as_adapter_tensor(torch.full((1,), float(r)), base, autocast)
    layer.ranknum[name].requires_grad_(False)
    layer.r[name], layer.lora_alpha[name] = r, config.lora_alpha
    layer.scaling[name] = svd_scaling(config.lora_alpha, r)
    layer.active_adapters = [name]


def keep_triplets(layer: nn.Module, name: str, keep: torch.Tensor) -> None:
    """Drop the triplets `keep` (a (r,) bool mask) marks False: A's rows, E's entries, B's columns. ranknum and
    scaling stay, as in PEFT's resize_modules_by_rank_pattern, so the kept triplets compute what they did."""
    keep = keep.to(layer.lora_A[name].device)
    for container, part in ((layer.lora_A, lambda p: p[keep]), (layer.lora_E, lambda p: p[keep]),
                            (layer.lora_B, lambda p: p[:, keep])):
        old = container[name]
        container[name] = nn.Parameter(part(old.detach()).clone(), requires_grad=old.requires_grad)
    layer.r[name] = int(keep.sum())


def delete_svd_adapter(layer: nn.Module, name: str) -> None:
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
    for container in (layer.lora_dropout, layer.lora_A, layer.lora_B, layer.lora_E, layer.ranknum):
        if name in container:
            del container[name]
    for table in (layer.r, layer.lora_alpha, layer.scaling):
        table.pop(name, None)
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def svd_product(layer: nn.Module, name: str) -> torch.Tensor:
    """B (A * E) * scaling / (ranknum + eps): the (out, r) @ (r, columns) update in PEFT's operation order."""
    A, B, E = layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
    return B @ (A * E) * layer.scaling[name] / (layer.ranknum[name] + RANKNUM_EPS)


def check_mergeable(layer: nn.Module) -> None:
    """Raise before anything is merged (the backend asks every layer first: no half-merged model)."""
    if isinstance(layer.base_layer, QuantLinear):
        raise TypeError("cannot merge AdaLoRA into a quantized base layer in place; use merge_and_unload()")


def merge_svd(layer: nn.Module, adapter_names: list[str] | None) -> None:
    check_mergeable(layer)
    for name in adapter_names or layer.active_adapters:
        if name in layer.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
            warnings.warn(f"adapter {name!r} is merged already: nothing to do")
            continue
        if name in layer.lora_A:
            add_to_weight(layer.base_layer.weight, layer.delta_weight(name).detach())
            layer.merged_adapters.append(name)


def unmerge_svd(layer: nn.Module) -> None:
    """Take the merged adapters out again, last merged first."""
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        add_to_weight(layer.base_layer.weight, -layer.delta_weight(name).detach())


def svd_params(layer: nn.Module, name: str) -> Iterator[nn.Parameter]:
    if name in layer.lora_A:
        yield from (layer.lora_A[name], layer.lora_B[name], layer.lora_E[name])


def add_to_weight(W: torch.Tensor, delta: torch.Tensor) -> None:
    """PEFT's in-place `weight.data += delta`: added in the wider dtype, rounded once to W's."""
    wide = torch.promote_types(W.dtype, delta.dtype)
    W.data.copy_(W.detach().to(wide) + delta.to(W.device, wide))


class AdaLoraLinear(nn.Module):
    """AdaLoRA around an nn.Linear, a GPT-2 Conv1D (ours or transformers') or a QuantLinear (PEFT's SVDLinear)."""

    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: base_layer is no target of its own
    unsaved_state = ("ranknum",)  # PEFT leaves it out of files: a loaded adapter takes init_r (adapter_keys)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        init_svd_state(self, base_layer)

    @property
    def fan_in_fan_out(self) -> bool:
        return is_conv1d(self.base_layer)

    def add_adapter(self, name: str, config, r: int, autocast_dtype: bool = True) -> None:
        add_svd_adapter(self, name, config, r, self.in_features, autocast_dtype)

    def delete_adapter(self, name: str) -> None:
        delete_svd_adapter(self, name)

    def adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        return svd_params(self, name)

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return apply_adapters(self, self.base_layer(x), x, adapter_names, self.lora_A)

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + (dropout(x) @ (A * E)^T @ B^T) * scaling / ranknum, x in the adapter's dtype (PEFT's cast)."""
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        h = self.lora_dropout[name](x.to(A.dtype))
        return out + (h @ (A * E).T @ B.T) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in), or (in, out) in a Conv1D's layout."""
        delta = svd_product(self, name)
        return delta.T if self.fan_in_fan_out else delta

    def check_mergeable(self, names: list[str]) -> None:
        check_mergeable(self)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        merge_svd(self, adapter_names)

    def unmerge(self) -> None:
        unmerge_svd(self)


class AdaLoraConv2d(nn.Module):
    """AdaLoRA around an nn.Conv2d (PEFT's SVDConv2d): A is (r, in * kh * kw), the update a kernel-shaped dW."""

    is_adapter_wrapper = True
    unsaved_state = ("ranknum",)

    def __init__(self, base_layer: nn.Conv2d):
        super().__init__()
        if base_layer.groups != 1:  # PEFT's reshape of an (out, in * k) update fails for grouped kernels
            raise TypeError(f"AdaLoRA adapts Conv2d with groups=1 (this one has groups={base_layer.groups}), "
                            "as HF PEFT's SVDConv2d can")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        init_svd_state(self, base_layer)

    def add_adapter(self, name: str, config, r: int, autocast_dtype: bool = True) -> None:
        kh, kw = self.base_layer.kernel_size
        add_svd_adapter(self, name, config, r, self.in_features * kh * kw, autocast_dtype)

    def delete_adapter(self, name: str) -> None:
        delete_svd_adapter(self, name)

    def adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        return svd_params(self, name)

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return apply_adapters(self, self.base_layer(x), x, adapter_names, self.lora_A)

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        h = self.lora_dropout[name](x.to(self.lora_A[name].dtype))
        return out + F.conv2d(h, self.delta_weight(name), stride=base.stride, padding=base.padding,
                              dilation=base.dilation, groups=base.groups)

    def delta_weight(self, name: str) -> torch.Tensor:
        return svd_product(self, name).reshape(self.base_layer.weight.shape)  # (out, in, kh, kw)

    def check_mergeable(self, names: list[str]) -> None:
        check_mergeable(self)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        merge_svd(self, adapter_names)

    def unmerge(self) -> None:
        unmerge_svd(self)


ADALORA_LAYERS = (AdaLoraLinear, AdaLoraConv2d)
