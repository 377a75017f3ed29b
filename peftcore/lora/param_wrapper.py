"""LoRA on a bare nn.Parameter (HF PEFT's `LoraConfig.target_parameters`, its lora.ParamWrapper, 0.21.2).

Why a layer of its own: MoE blocks keep their experts as one stacked parameter, e.g. `gate_up_proj` of shape
(num_experts, in, out), used through torch.bmm / einsum rather than an nn.Linear per expert, so there is no linear
module to wrap. ParamWrapper wraps the module that owns the parameter and runs that module's own forward with the
parameter replaced by W + delta (torch.func.functional_call: nothing in the module changes, and the replacement
is gone when the call returns). Reading `module.<param>` outside a forward gives the plain W, as in PEFT.

Layout (PEFT's, so adapter files move both ways key for key), E experts, rank r:
  2-D W (out, in):                      lora_A (r, in),     lora_B (out, r),     delta = s * B A
  3-D W (E, P, Q):                      lora_A (r*E, Q),    lora_B (P, r*E),     delta[e] = s * B_e A_e
  3-D W (E, P, Q), module.is_transposed: lora_A (r*E, P),    lora_B (Q, r*E),     delta[e] = s * (B_e A_e)^T
  with A_e = rows e*r .. e*r+r-1 of A (expert-major) and B_e = columns e, e+E, e+2E, ... of B (expert-minor).
(E == 1 takes the 2-D formula, s * B A, as PEFT does, broadcast over the expert dim; so a one-expert transposed
(1, P, Q) stack gets a (Q, P) update, which fits only for P == Q: other shapes are refused, where PEFT's forward fails.)

Several parameters of one module: the wrappers nest, the first-registered parameter's innermost, so the second
wrapper's keys read `<module>.lora_A...` and the first one's `<module>.base_layer.lora_A...`. Each wrapper replaces
its own parameter on the real module, reached through "base_layer." once per wrapper in between.

Refused, as in PEFT (the update W + s*B*A has no per-input path): lora_dropout != 0, fan_in_fan_out, lora_bias,
use_dora, mixed adapter_names batches; also the initialisations that factor a weight (PiSSA / OLoRA).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from peftcore.config import LoraConfig
from peftcore.lora.init import PLAIN_INITS, init_adapter
from peftcore.lora.layer import FLOAT8_NAMES, UPCAST_DTYPES, delete_from, init_adapter_state, lora_scaling

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # PEFT's ALLOWED_COMPUTE_DTYPES
FLOAT8_DTYPES = tuple(getattr(torch, n) for n in FLOAT8_NAMES if hasattr(torch, n))


def refusal(config: LoraConfig, r: int) -> str | None:
    """Why adapter options cannot apply to a bare parameter (None: they can)."""
    if config.lora_dropout:
        return f"lora_dropout={config.lora_dropout} (dropout acts on a layer's input, and W + s*B*A has none)"
    if config.fan_in_fan_out:
        return "fan_in_fan_out=True (the layout follows the parameter's shape)"
    if config.lora_bias:
        return "lora_bias=True (a bare parameter has no output to add a bias to)"
    if config.use_dora:
        return "use_dora=True (DoRA needs a weight's output rows)"
    if config.init_lora_weights not in PLAIN_INITS:
        return f"init_lora_weights={config.init_lora_weights!r} (a weight factorisation; use True, False or 'gaussian')"
    if r <= 0:
        return f"r={r} (the rank must be positive)"
    return None


def check_shape(module: nn.Module, param_name: str, key: str) -> None:
    """`module.<param_name>` is a floating-point 2-D (out, in) or 3-D (experts, ., .) tensor that PEFT's layout fits,
    else a one-line error naming it (`key`)."""
    param = getattr(module, param_name)
    if not isinstance(param, torch.Tensor) or not param.is_floating_point():
        kind = param.dtype if isinstance(param, torch.Tensor) else type(param).__name__
        raise TypeError(f"target_parameters: {key!r} is a {kind}, not a floating-point nn.Parameter; LoRA adds a "
                        "float update to it")
    if param.dim() not in (2, 3):
        raise ValueError(f"target_parameters: {key!r} has shape {tuple(param.shape)}; LoRA takes 2-D (out, in) and "
                         "3-D (experts, in, out) parameters, as HF PEFT")
    if param.dim() == 3 and param.shape[0] == 1 and getattr(module, "is_transposed", False) and \
            param.shape[1] != param.shape[2]:
        # PEFT's one-expert update is s * B A of shape (Q, P), added to (1, P, Q): its forward fails on the shapes
        raise ValueError(f"target_parameters: {key!r} is a one-expert stack {tuple(param.shape)} with is_transposed, "
                         "whose update HF PEFT lays out as (Q, P), which does not fit it (PEFT's forward fails); "
                         "store it as a 2-D (out, in) parameter, or leave it out of target_parameters")


def add_low_precision(W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + delta for a float8 W: the sum in delta's dtype, clamped to W's range (else the cast back makes NaNs)."""
    if delta.dtype not in COMPUTE_DTYPES:
        raise RuntimeError(f"a {W.dtype} parameter is adapted in the adapter's dtype, which must be one of "
                           f"{COMPUTE_DTYPES}, not {delta.dtype}: keep autocast_adapter_dtype=True")
    info = torch.finfo(W.dtype)
    return (W.to(delta.dtype) + delta).clamp(min=info.min, max=info.max).to(W.dtype)


class ParamWrapper(nn.Module):
    """LoRA adapters on the parameter `parameter_name` of `base_layer` (the module itself, or the ParamWrapper of
    another of its parameters)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        check_shape(self.real_module(), parameter_name, f"{type(self.real_module()).__name__}.{parameter_name}")
        param = self.get_param()
        self.num_experts = param.shape[0] if param.dim() == 3 else 1
        # PEFT's in/out swap: a 3-D parameter is (E, in, out) unless the module says is_transposed ((E, out, in))
        self.swapped = param.dim() == 3 and not getattr(self.real_module(), "is_transposed", False)
        if param.dim() == 2:
            self.in_features, self.out_features = param.shape[1], param.shape[0]
        else:
            self.in_features, self.out_features = (param.shape[2], param.shape[1]) if self.swapped else param.shape[1:]
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        init_adapter_state(self)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"

    @property
    def fan_in_fan_out(self) -> bool:
        return False  # refused for parameters (PEFT's rule); the layout follows the shape

    def real_module(self) -> nn.Module:
        """The module that owns the parameter, under any ParamWrappers of its other parameters."""
        module = self.base_layer
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        return module

    def get_param(self) -> torch.Tensor:
        return getattr(self.real_module(), self.parameter_name)

    def param_path(self) -> str:
        """The parameter's name seen from base_layer: "base_layer." once per ParamWrapper in between."""
        depth, module = 0, self.base_layer
        while isinstance(module, ParamWrapper):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        """As PEFT: A and B made as float32 nn.Linears on the default device, initialised there, then moved to the
        parameter's device and dtype, then (autocast_dtype) float16 / bfloat16 / float8 ones upcast to float32."""
        why = refusal(config, r)
        if why:
            raise ValueError(f"LoRA on the parameter {self.parameter_name!r} does not work with {why}, as in HF PEFT")
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        self.lora_dropout[name] = nn.Identity()
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, config.use_rslora)
        init_adapter(self, name, config.init_lora_weights)
        param = self.get_param()
        for module in (self.lora_A[name], self.lora_B[name]):
            if module.weight.is_meta:  # low_cpu_mem_usage: PEFT leaves meta adapters as made
                continue
            module.to(param.device, dtype=param.dtype)
            if autocast_dtype and param.dtype in UPCAST_DTYPES:
                module.to(torch.float32)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_from(self, name, (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector))

    def adapter_params(self, name: str):
        for container in (self.lora_A, self.lora_B):
            if name in container:
                yield from container[name].parameters()

    # -- the update -----------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the parameter's layout (E == 1: (out, in), broadcast over a 3-D parameter's expert dim),
        in the parameter's dtype when that is fp16 / bf16 / fp32 (a float8 parameter adds it in the adapter's)."""
        A, B, s, E = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.num_experts
        if E == 1:
            half_on_cpu = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
            delta = (B.float() @ A.float()) * s if half_on_cpu else (B @ A) * s
            delta = delta.to(B.dtype)
        else:
            experts_A = A.reshape(E, -1, A.shape[-1])  # (E, r, in): expert-major rows
            experts_B = B.reshape(B.shape[0], -1, E)  # (out, r, E): expert-minor columns
            delta = torch.einsum("ore,eri->eoi" if self.swapped else "ore,eri->eio", experts_B, experts_A) * s
        W = self.get_param()
        return delta.to(W.device, W.dtype) if W.dtype in COMPUTE_DTYPES else delta.to(W.device)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs), (E, ., r) and (E, r, .) in the parameter's dtype, with delta = s * lhs @ rhs."""
        A, B, E = self.lora_A[name].weight, self.lora_B[name].weight, self.num_experts
        experts_A = A.reshape(E, -1, A.shape[-1])  # (E, r, in)
        experts_B = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (experts_B, experts_A) if self.swapped else (experts_A.mT, experts_B.mT)
        dtype = self.get_param().dtype
        return lhs.to(dtype), rhs.to(dtype)

    def adapted_param(self, names: list[str]) -> torch.Tensor:
        """W + the adapters' updates, as PEFT's forward forms it: one adapter on an expert stack as a single
        baddbmm (no delta the size of the stack), else W + the sum of the delta_weights."""
        W = self.get_param()
        if len(names) == 1 and self.num_experts > 1 and W.dtype not in FLOAT8_DTYPES:
            lhs, rhs = self.factors(names[0])
            with torch.autocast(device_type=W.device.type, enabled=False):
                return torch.baddbmm(W, lhs, rhs, alpha=self.scaling[names[0]])
        delta = self.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.delta_weight(name)
        return add_low_precision(W, delta) if W.dtype in FLOAT8_DTYPES else W + delta

    # -- forward --------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:
            raise ValueError(f"LoRA on the parameter {self.parameter_name!r} (target_parameters) cannot run a mixed "
                             "adapter_names batch, as in HF PEFT: run one adapter (set_adapter) per batch")
        if self.disable_adapters and self.merged_adapters:
            raise RuntimeError("adapters are merged into the base weight; unmerge before disabling them")
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters or self.merged_adapters or not names:
            return self.base_layer(*args, **kwargs)
        replaced = {self.param_path(): self.adapted_param(names)}
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs, tie_weights=False)

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def check_mergeable(self, names: list[str]) -> None:
        """Raise before anything is merged: a float8 parameter cannot take W + delta in place (torch does not
        promote float8; PEFT fails there with torch's RuntimeError). Others always can (no lora_bias here)."""
        param = self.get_param()
        if param.dtype in FLOAT8_DTYPES and any(n in self.lora_A and n not in self.merged_adapters for n in names):
            raise RuntimeError(f"cannot merge into the {param.dtype} parameter {self.parameter_name!r} in place (torch "
                               "has no float8 arithmetic); use the adapter unmerged")

    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        self.check_mergeable(names)
        param = self.get_param()
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged into {self.parameter_name!r}: nothing to do")
                continue
            if name in self.lora_A:
                with torch.no_grad():
                    param.data += self.delta_weight(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        param = self.get_param()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                param.data -= self.delta_weight(name).to(param.dtype)
