"""VeRA layers: two trained vectors per layer around a pair of frozen random projections the whole model shares.

    y = base(x) + lambda_b * (B_s (lambda_d * (A_s dropout(x))))      A_s = vera_A[:, :in]  (r, in)
                                                                       B_s = vera_B[:out, :] (out, r)

vera_A (r, in_max) / vera_B (out_max, r) are drawn once per model (make_projections) at the largest in / out
features among the targeted layers; each layer slices its corner. Trained: lambda_d (r,) and lambda_b (out,).
Names and nesting equal HF PEFT's (`vera_lambda_b.<name>`, `vera_lambda_d.<name>`, and every layer holds the
shared BufferDicts as `vera_A` / `vera_B`), so state dicts line up key for key; PEFT's keys repeat the shared
projections under every layer, and so do ours, since the same BufferDict module is a child of each layer.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.lora.layer import adapter_dtype, base_output_stands, is_conv1d, linear_features, mixed_rows
from peftcore.models.quantized import QuantLinear
from peftcore.vera.config import VeraConfig


class BufferDict(nn.Module):
    """Named tensors registered as buffers (PEFT's BufferDict): they follow .to() and sit in the state dict
    under `<module>.<key>` when `persistent` (save_projection), and stay out of it otherwise."""

    def __init__(self, persistent: bool = True):
        super().__init__()
        self.persistent = persistent
        self.prng_key: int | None = None  # the projection_prng_key the projections were drawn with

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        self.register_buffer(key, tensor, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a BufferDict holds VeRA's shared projections; it is not a layer to call")

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in) (kaiming-uniform, gain sqrt 2) drawn from `generator`:
    PEFT's _kaiming_init, same float operations in the same order, so the same key gives the same bits."""
    tensor = torch.empty(shape)  # the default dtype, on the CPU, as PEFT's
    fan_in = shape[1]  # torch's fan_in of a 2-D tensor: its second dimension
    std = math.sqrt(2) / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def make_projections(r: int, in_max: int, out_max: int, prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vera_A (r, in_max) then vera_B (out_max, r) from one CPU generator seeded with `prng_key`: PEFT's order
    of draws, so the projections equal PEFT's (a file saved with save_projection=False relies on this)."""
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = kaiming_uniform((r, in_max), generator)
    vera_B = kaiming_uniform((out_max, r), generator)
    return vera_A, vera_B


def base_dtype_device(layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype the base computes in and its device (a quantized layer: its compute dtype, its buffers' device)."""
    if isinstance(layer, QuantLinear):
        return layer.compute_dtype, next(layer.buffers()).device
    return layer.weight.dtype, layer.weight.device


def through_base_dtype(t: torch.Tensor, base: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """PEFT first moves a new adapter's tensors to the base layer's dtype, then (autocast_adapter_dtype) upcasts
    them to float32: an fp32 adapter on a bf16 base holds bf16-rounded values. Kept, so that the shared
    projections, d_initial and the init_weights=False draws equal PEFT's bit for bit on half-precision bases."""
    if base.is_floating_point:
        t = t.to(device, base)
    return t.to(device, dtype)


class VeraLinear(nn.Module):
    """VeRA around an nn.Linear, a GPT-2 Conv1D (ours or transformers') or a QuantLinear (forward only)."""

    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: base_layer, vera_A, ... are no targets
    # the model-wide projections every layer holds a reference to: saved once, from their holder (adapter_keys)
    shared_state = ("vera_A", "vera_B")

    def __init__(self, base_layer: nn.Module, vera_A: BufferDict, vera_B: BufferDict):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        # registered in PEFT's order, so state_dict() lists the keys as PEFT's does
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()  # (out,) per adapter
        self.vera_lambda_d = nn.ParameterDict()  # (r,) per adapter
        self.vera_A, self.vera_B = vera_A, vera_B  # the model's shared projections: references, not copies
        self.r: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def fan_in_fan_out(self) -> bool:
        """The base stores (in, out) (GPT-2's Conv1D): merges transpose the delta."""
        return is_conv1d(self.base_layer)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: VeraConfig, autocast_dtype: bool = True) -> None:
        """Adapter `name`, whose projections inject_vera has put into the shared vera_A / vera_B already.
        `autocast_dtype`: float32 vectors on a half-precision base (lora.layer.adapter_dtype)."""
        if name not in self.vera_A or name not in self.vera_B:
            raise ValueError(f"no shared projection for adapter {name!r}: add VeRA adapters with inject_vera, which "
                           "draws vera_A / vera_B first")
        base, device = base_dtype_device(self.base_layer)
        dtype = adapter_dtype(base, autocast_dtype)
        for shared in (self.vera_A, self.vera_B):
            shared[name] = through_base_dtype(shared[name], base, dtype, device)
        check_fits(self.vera_A[name], self.vera_B[name], config.r, self.in_features, self.out_features)
        # the global RNG in PEFT's order: ones() draws nothing, randn(r) is lambda_d's init_weights=False value
        lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(config.r)
        if config.init_weights:  # lambda_b = 0: the new adapter leaves the output as it was
            lambda_d.fill_(config.d_initial)
            lambda_b.zero_()
        self.vera_lambda_b[name] = nn.Parameter(through_base_dtype(lambda_b, base, dtype, device))
        self.vera_lambda_d[name] = nn.Parameter(through_base_dtype(lambda_d, base, dtype, device))
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.r[name] = config.r
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name` (unmerged only), its entry in the shared projections too (as PEFT's, whose
        delete_adapter clears vera_A / vera_B): the other layers share that dict, so it goes for all of them."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        for container in (self.vera_lambda_b, self.vera_lambda_d, self.vera_dropout, self.vera_A, self.vera_B):
            if name in container:
                del container[name]
        self.r.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        """lambda_b and lambda_d: the projections are frozen buffers."""
        if name in self.vera_lambda_d:
            yield from (self.vera_lambda_b[name], self.vera_lambda_d[name])

    def projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corner of the shared projections: A_s (r, in), B_s (out, r)."""
        return self.vera_A[name][:, : self.in_features], self.vera_B[name][: self.out_features, :]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        out = self.base_layer(x)
        if base_output_stands(self, adapter_names):
            return out
        if adapter_names is not None:
            return mixed_rows(out, x, adapter_names, self.vera_lambda_d, self.add_vera)
        dtype = out.dtype
        for name in self.active_adapters:  # several active: their terms add up, as PEFT's loop
            if name in self.vera_lambda_d:
                out = self.add_vera(out, x, name)
        return out.to(dtype)  # the sum in the adapters' dtype, cast back once, as PEFT's

    def add_vera(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + lambda_b * B_s(lambda_d * A_s(dropout(x))), x in the adapter's dtype (PEFT's cast)."""
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A, B = self.projections(name)
        h = self.vera_dropout[name](x.to(lambda_d.dtype))
        return out + lambda_b * F.linear(lambda_d * F.linear(h, A.to(x.device)), B.to(x.device))

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """(lambda_b B_s)(lambda_d A_s), (out, in), in the base weight's layout ((in, out) for Conv1D), in the
        projections' dtype. Half precision on the CPU is computed in float32 and cast back, as PEFT's."""
        A, B = self.projections(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        dtype = B.dtype
        if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # slow half matmuls on CPUs
            A, B, lambda_b, lambda_d = A.float(), B.float(), lambda_b.float(), lambda_d.float()
        delta = (lambda_b[:, None] * B) @ (lambda_d[:, None] * A.to(lambda_d.device))  # (out, r) @ (r, in)
        delta = delta.to(dtype)
        return delta.T if self.fan_in_fan_out else delta

    def check_mergeable(self, names: list[str]) -> None:
        """Raise before anything is merged (PeftModel checks every layer first: no half-merged model)."""
        if isinstance(self.base_layer, QuantLinear):
            raise TypeError("cannot merge VeRA into a quantized base layer in place; use merge_and_unload()")

    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        self.check_mergeable(names)
        for name in names:
            if name in self.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
                warnings.warn(f"adapter {name!r} is merged already: nothing to do")
                continue
            if name in self.vera_lambda_d:
                self.add_to_weight(self.delta_weight(name).detach())
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters out again, last merged first (exact up to rounding in the weight's dtype)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.add_to_weight(-self.delta_weight(name).detach())

    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W += delta as PEFT's in-place add: in the wider dtype of the two, rounded once to W's dtype."""
        W = self.base_layer.weight
        wide = torch.promote_types(W.dtype, delta.dtype)
        W.data.copy_(W.detach().to(wide) + delta.to(W.device, wide))


def check_fits(vera_A: torch.Tensor, vera_B: torch.Tensor, r: int, in_features: int, out_features: int) -> None:
    """The shared projections must cover this layer (in <= vera_A's columns, out <= vera_B's rows) and have r
    rows: PEFT draws them for the first adapter's targets, and later adapters reuse them."""
    if vera_A.shape[1] < in_features or vera_B.shape[0] < out_features:
        raise ValueError(f"the shared VeRA projections (vera_A {tuple(vera_A.shape)}, vera_B {tuple(vera_B.shape)}) "
                         f"are too small for a layer of in_features={in_features}, out_features={out_features}: they "
                         "are sized for the first adapter's targets; add the adapter with the widest targets first")
    if vera_A.shape[0] != r or vera_B.shape[1] != r:
        raise ValueError(f"r={r} differs from the shared VeRA projections' r={vera_A.shape[0]} (drawn for the first "
                         "adapter): every VeRA adapter of a model uses the same r")
