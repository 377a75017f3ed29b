"""LoRA and DoRA layers, written by hand around the layer they adapt (the base-layer pattern).

LoraLinear:    y = base(x) + s * B(A(dropout(x)))              for nn.Linear and GPT-2's Conv1D (ours or transformers')
DoRA:          y = m / ||W + s*B*A||_row * (W x + s*B*A x) + b  (row norm detached, DoRA paper §4.3)
LoraEmbedding: y = E[x] + s * (A^T[x]) B^T

Parameter names and nesting equal HF PEFT's (`base_layer`, `lora_A.<name>`, `lora_B.<name>`,
`lora_magnitude_vector.<name>.weight`, `lora_embedding_A.<name>`), so state dicts and adapter
files line up key for key. Several named adapters live side by side in one layer.
nn.Conv1d / 2d / 3d: peftcore.lora.conv (LoraConv), built on the bookkeeping shared here.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.config import LoraConfig

# The module, not its names: the kernel tests reload the kernels under TRITON_INTERPRET=1, and the
# layers must then call the reloaded ones.
from peftcore.kernels import lora_linear
from peftcore.lora.init import init_adapter
from peftcore.models.layers import Conv1D
from peftcore.models.quantized import QuantLinear


@runtime_checkable
class Adapter(Protocol):
    """DESIGN's adapter contract: what PeftModel, adapter_io and the analysis code may call on an adapter
    layer (LoraLinear, LoraEmbedding), by adapter name as in HF PEFT's layers. Structural, so an adapter
    kind needs no base class; tests/peftcore/lora/test_adapter_protocol.py checks the layers satisfy it."""

    def adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable parameters of adapter `name` in this layer."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters (default: the active ones) into the base weight, in place."""

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again."""

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter `name` adds to the base weight, in the base weight's layout."""


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# PEFT's cast_adapter_dtype (tuners_utils, 0.21.2) upcasts these to float32: fp16 / bf16 and the float8 kinds.
FLOAT8_NAMES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
UPCAST_DTYPES = {torch.float16, torch.bfloat16} | {getattr(torch, n) for n in FLOAT8_NAMES if hasattr(torch, n)}


def adapter_dtype(base_dtype: torch.dtype, autocast: bool = True) -> torch.dtype:
    """The dtype a new adapter's weights take on a base of `base_dtype`. As in PEFT (autocast_adapter_dtype=True),
    float32 on a half-precision base: bf16 keeps 8 significant bits, so an optimizer step below ~2^-9 of a
    weight rounds away (test_peft_parity_faults: a 0.1% step leaves a bf16 adapter unchanged). autocast=False
    keeps the base dtype (PEFT's autocast_adapter_dtype=False)."""
    if not base_dtype.is_floating_point:
        return torch.float32
    return torch.float32 if autocast and base_dtype in UPCAST_DTYPES else base_dtype


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: ours, or transformers' (every HF GPT-2-family model has it), which library code may not
    import, so it is known by its forward contract: a class named Conv1D with an int `nf` and a 2-D weight
    stored (in_features, nf). HF PEFT adapts exactly these as fan_in_fan_out linears."""
    if isinstance(module, Conv1D):
        return True
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nf, int) and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and weight.shape[1] == nf)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); transformers' Conv1D names neither, its (in, out) weight shape tells."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's dense weight as (out, in): Conv1D stores (in, out); quantized layers dequantize."""
    if isinstance(layer, QuantLinear):
        return layer.dequantize()
    return layer.weight.T if is_conv1d(layer) else layer.weight


def kernel_base(layer: nn.Module) -> lora_linear.LinearWeights | None:
    """The base as weights a fused path can run in place of its forward, or None. Exact types only (a
    subclass may change forward; so transformers' Conv1D, known by name only, runs its own forward), and no
    hooks (the fused paths would skip them)."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if type(layer) is QuantLinear:
        return lora_linear.LinearWeights(layer.qweight, layer.bias, layer.compute_dtype)
    if type(layer) is nn.Linear or type(layer) is Conv1D:
        W = base_weight(layer)
        return lora_linear.LinearWeights(W, layer.bias, W.dtype)
    return None


def dora_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """||W_i + s (BA)_i|| for every output row i, without forming the (out, in) matrix BA.

    ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T
    Cost: one (out, in, r) GEMM and O((out + in) r^2) — vs an (out, in, r) GEMM *and* an out x in
    temporary for the dense form. W: (out, in), A: (r, in), B: (out, r) -> (out,) in fp32 (fp64 for
    fp64 weights: the sums are accumulated in at least fp32, never narrowed).
    """
    acc = torch.promote_types(W.dtype, torch.float32)
    W_sq = torch.linalg.vector_norm(W, dim=1, dtype=acc).square()
    # in the wider dtype of the two: fp32 adapters on a bf16 W take W's fp32 copy (as PEFT's DoRA forward
    # does), since rounding A to bf16 would put a 2^-9 relative error in the cross term
    wide = torch.promote_types(W.dtype, A.dtype)
    WAt = (W.to(wide) @ A.to(wide).T).to(acc)  # (out, r)
    A_, B_ = A.to(acc), B.to(acc)
    cross = (B_ * WAt).sum(dim=1)
    lora_sq = ((B_ @ (A_ @ A_.T)) * B_).sum(dim=1)
    return (W_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def init_adapter_state(layer: nn.Module) -> None:
    """The per-adapter bookkeeping every LoRA layer keeps under PEFT's attribute names (the backends, the
    adapter files and the merges read them); the A / B containers differ per layer type and are set by it."""
    layer.lora_dropout = nn.ModuleDict()
    layer.lora_magnitude_vector = nn.ModuleDict()
    layer.r: dict[str, int] = {}
    layer.scaling: dict[str, float] = {}
    layer.active_adapters: list[str] = []
    layer.merged_adapters: list[str] = []
    layer.disable_adapters = False
    layer._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm used when merging, to undo it


class Magnitude(nn.Module):
    """DoRA's learned magnitude vector, one entry per output feature (a module so its key is `.weight`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(nn.Module):
    """LoRA / DoRA around an nn.Linear, a GPT-2 Conv1D (ours or transformers'), or a QuantLinear (QLoRA)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        init_adapter_state(self)

    @property
    def fan_in_fan_out(self) -> bool:
        """The base stores (in, out) (GPT-2's Conv1D). A property: merging a quantized GPT-2 layer swaps
        the base for its dense Conv1D, and the orientation must follow."""
        return is_conv1d(self.base_layer)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        """`autocast_dtype`: float32 weights on a half-precision base (adapter_dtype)."""
        weight = base_weight(self.base_layer)
        dtype = adapter_dtype(weight.dtype, autocast_dtype)
        kw = dict(device=weight.device, dtype=dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **kw)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, config.use_rslora)
        # PiSSA / OLoRA / LoftQ also rewrite the base weight
        init_adapter(self, name, config.init_lora_weights, config.loftq_config)
        if config.use_dora:
            with torch.no_grad():
                norm = dora_row_norm(base_weight(self.base_layer), self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.scaling[name])
            self.lora_magnitude_vector[name] = Magnitude(norm.to(dtype))
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_from(self, name, (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector))

    def adapter_params(self, name: str):
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in container:
                yield from container[name].parameters()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        fused = self.fused_call(x, adapter_names)
        if fused is not None:
            return lora_linear.lora_linear(*fused)
        return apply_adapters(self, self.base_layer(x), x, adapter_names, self.lora_A)

    def fused_call(self, x: torch.Tensor, adapter_names) -> tuple | None:
        """lora_linear's arguments when one plain LoRA adapter runs alone over a base a fused path takes
        (lora_linear.path), else None: DoRA, lora_bias, mixed batches, several active, merged or disabled
        adapters run the modules (apply_adapters)."""
        if adapter_names is not None or self.disable_adapters or self.merged_adapters:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        base = kernel_base(self.base_layer)
        if len(names) != 1 or base is None:
            return None
        name = names[0]
        if name in self.lora_magnitude_vector or self.lora_B[name].bias is not None:
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        route = lora_linear.path(x, base, A, B, p)
        return None if route is None else (x, base, A, B, self.scaling[name], p, route)

    def can_fuse(self, x: torch.Tensor, adapter_names) -> bool:
        """Whether this call runs the Triton kernels: base and adapter as one kernel (bench and tests count them)."""
        fused = self.fused_call(x, adapter_names)
        return fused is not None and fused[-1] == lora_linear.TRITON

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + this adapter's term, in the wider of the two dtypes (apply_adapters casts back once, as PEFT's
        lora.Linear.forward: x goes to the adapter's dtype, the sum back to the base's)."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        x_lora = dropout(x.to(A.weight.dtype))
        if name in self.lora_magnitude_vector:
            return out + self.dora_delta(x_lora, out, name)
        h = A(x_lora)  # (..., r)
        if B.bias is None and out.dtype == h.dtype:
            # out + s * h B^T as one GEMM with beta=1: no separate scale and add passes over (M, N)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.weight.T, alpha=s)
            return flat.view(out.shape)
        return out + B(h) * s

    def dora_delta(self, x_lora: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """What DoRA adds to base(x): (mag - 1) * W x + mag * s * B A x, with mag = m / ||W + sBA||."""
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        W = base_weight(self.base_layer)
        norm = dora_row_norm(W, A, B.detach(), s).detach()
        mag = self.lora_magnitude_vector[name].weight / norm  # (out,), the adapter's dtype
        # PEFT's test: whether dropout ran, not `x_lora is x` (x_lora is a copy whenever the adapter's dtype differs)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_no_bias = out if bias is None else out - bias
        else:  # dropout active: PEFT re-runs the base GEMM on the dropped input (in the adapter's dtype)
            base_no_bias = F.linear(x_lora, W.to(x_lora.dtype))
        lora = F.linear(F.linear(x_lora, A), B) * s
        return (mag - 1) * base_no_bias + mag * lora

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the base weight's layout ((in, out) for Conv1D), as HF PEFT's get_delta_weight."""
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def dora_factor(self, name: str) -> torch.Tensor:
        """m / ||W + sBA||_row, shaped to scale the stored weight ((in, out) for Conv1D: per column)."""
        factor = self.lora_magnitude_vector[name].weight.detach() / self._merge_norms[name]
        return factor[None, :] if self.fan_in_fan_out else factor[:, None]

    def check_mergeable(self, names: list[str]) -> None:
        """Raise before anything is merged (PeftModel checks every layer first: no half-merged model)."""
        if isinstance(self.base_layer, QuantLinear):
            raise TypeError("cannot merge into a quantized base layer in place; use merge_and_unload()")
        check_bias_mergeable(self, names)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        self.check_mergeable(names)
        add_lora_biases(self, merge_weights(self, names, self.lora_A), 1)

    def dora_norm(self, W: torch.Tensor, name: str) -> torch.Tensor:
        """||W + sBA|| per output row, W in the base weight's layout."""
        return dora_row_norm(W.T if self.fan_in_fan_out else W, self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name])

    def unmerge(self) -> None:
        add_lora_biases(self, unmerge_weights(self), -1)


class LoraEmbedding(nn.Module):
    """LoRA / DoRA on an nn.Embedding: A (r, vocab) is looked up like an embedding table, B is (dim, r).

    DoRA here (as in PEFT) has one magnitude per embedding dimension: m / ||E^T + s*B*A||_row scales
    the whole output row, y = mag * (E[x] + s * A^T[x] B^T).
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim  # PEFT's names
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        init_adapter_state(self)

    def add_adapter(self, name: str, config: LoraConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported on embedding layers (as in HF PEFT)")
        weight = self.base_layer.weight
        vocab, dim = weight.shape
        dtype = adapter_dtype(weight.dtype, autocast_dtype)
        A = torch.empty(r, vocab, dtype=dtype, device=weight.device)
        B = torch.empty(dim, r, dtype=dtype, device=weight.device)
        if config.init_lora_weights == "loftq":  # HF PEFT 0.21.2 fails here too (loftq_init() missing 'config')
            raise ValueError("init_lora_weights='loftq' is not defined for embedding layers (it factors a linear "
                             "weight's quantization error): leave the embedding out of target_modules")
        if config.init_lora_weights is False:
            nn.init.normal_(A), nn.init.normal_(B)
        else:  # HF PEFT swaps the roles for embeddings: A zeros, B normal
            nn.init.zeros_(A), nn.init.normal_(B)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = nn.Parameter(A), nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, config.use_rslora)
        if config.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector[name] = Magnitude(self.dora_norm(weight, name).to(dtype))
        self.active_adapters = [name]

    def dora_norm(self, E: torch.Tensor, name: str) -> torch.Tensor:
        """||E^T + s*B*A|| per embedding dimension, (dim,) fp32; E is the (vocab, dim) table."""
        return dora_row_norm(E.T, self.lora_embedding_A[name], self.lora_embedding_B[name].detach(), self.scaling[name])

    def delete_adapter(self, name: str) -> None:
        delete_from(self, name,
                    (self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout, self.lora_magnitude_vector))

    def adapter_params(self, name: str):
        if name in self.lora_embedding_A:
            yield from (self.lora_embedding_A[name], self.lora_embedding_B[name])
        if name in self.lora_magnitude_vector:
            yield from self.lora_magnitude_vector[name].parameters()

    def add_lora(self, out: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        """base output + this adapter's contribution, for the rows in `ids`."""
        base = self.base_layer
        after_A = F.embedding(ids, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type)
        lora = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)
        if name not in self.lora_magnitude_vector:
            return out + lora  # in the adapter's dtype if wider: apply_adapters casts back
        mag = self.lora_magnitude_vector[name].weight / self.dora_norm(base.weight, name).detach()
        return mag * (out + lora)

    def forward(self, ids: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return apply_adapters(self, self.base_layer(ids), ids, adapter_names, self.lora_embedding_A)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(vocab, dim), the embedding table's layout."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def dora_factor(self, name: str) -> torch.Tensor:
        return (self.lora_magnitude_vector[name].weight.detach() / self._merge_norms[name])[None, :]

    def check_mergeable(self, names: list[str]) -> None:
        """An embedding always takes its adapters (no lora_bias, no quantized tables)."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        merge_weights(self, adapter_names or self.active_adapters, self.lora_embedding_A)

    def unmerge(self) -> None:
        unmerge_weights(self)


def delete_from(layer, name: str, containers) -> None:
    """Drop adapter `name` from a LoRA layer's containers and bookkeeping (unmerged adapters only)."""
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
    for container in containers:
        if name in container:
            del container[name]
    layer.r.pop(name, None)
    layer.scaling.pop(name, None)
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def base_output_stands(layer, adapter_names) -> bool:
    """Whether a layer's base output is its output: adapters disabled, or merged into the weight already. Two
    states are refused: disabled while merged (the weight holds them anyway), a mixed batch while merged. Every
    method's layers ask this first."""
    if not (layer.disable_adapters or layer.merged_adapters):
        return False
    if layer.disable_adapters and layer.merged_adapters:
        raise RuntimeError("adapters are merged into the base weight; unmerge before disabling them")
    if adapter_names is not None and layer.merged_adapters:
        raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call unmerge_adapter() first")
    return True


def apply_adapters(layer, out: torch.Tensor, x: torch.Tensor, adapter_names, known) -> torch.Tensor:
    """The base output plus the active adapters (or one adapter per row); merged or disabled: as is.
    Shared by LoraLinear and LoraEmbedding; `known` holds the adapters this layer has. The sum is taken
    in the adapters' dtype (fp32 adapters on a bf16 base) and cast to the base's once, as in PEFT."""
    if base_output_stands(layer, adapter_names):
        return out
    if adapter_names is not None:
        return mixed_rows(out, x, adapter_names, known, layer.add_lora)
    dtype = out.dtype
    for name in layer.active_adapters:
        if name in known:
            out = layer.add_lora(out, x, name)
    return out.to(dtype)


# -- merge bookkeeping shared by LoraLinear, LoraEmbedding and LoraConv ---------------------------
def check_bias_mergeable(layer, names: list[str]) -> None:
    pending = [n for n in names if n in layer.lora_B and n not in layer.merged_adapters]
    biased = [n for n in pending if layer.lora_B[n].bias is not None]
    if biased and layer.base_layer.bias is None:  # PEFT raises the same RuntimeError
        raise RuntimeError(f"cannot merge adapter {biased[0]!r}: it has lora_bias=True but the base "
                           f"{type(layer.base_layer).__name__} has no bias to add it to; use the adapter unmerged")


def add_lora_biases(layer, names: list[str], sign: int) -> None:
    """lora_bias: lora_B's bias (times s) goes into (sign 1) or out of (-1) the base bias with its weights."""
    for name in names:
        if layer.lora_B[name].bias is not None:
            layer.base_layer.bias.data += sign * layer.lora_B[name].bias.detach() * layer.scaling[name]


def weight_without(layer, name: str, W: torch.Tensor) -> torch.Tensor:
    """The stored weight W with merged adapter `name` taken out again (DoRA: undo its factor first)."""
    if name in layer.lora_magnitude_vector:
        W = W / layer.dora_factor(name).to(W.dtype)
    return W - layer.delta_weight(name).detach().to(W.dtype)


def merge_weights(layer, names: list[str], known) -> list[str]:
    """Add each named adapter's delta_weight to the base weight in place (DoRA: then scale by
    m / ||W + sBA||, the norm taken on the weight without the adapters merged before this one, as
    the forward computes it). Shared by LoraLinear and LoraEmbedding. -> the names merged."""
    merged_now = []
    for name in names:
        if name in layer.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
            warnings.warn(f"adapter {name!r} is already merged into {type(layer.base_layer).__name__}: nothing to do")
            continue
        if name not in known:
            continue
        W = layer.base_layer.weight.detach()
        merged = W + layer.delta_weight(name).detach().to(W.dtype)
        if name in layer.lora_magnitude_vector:
            with torch.no_grad():
                layer._merge_norms[name] = layer.dora_norm(weight_before_merges(layer), name)
            merged = merged * layer.dora_factor(name).to(W.dtype)
        layer.base_layer.weight.data.copy_(merged)
        layer.merged_adapters.append(name)
        merged_now.append(name)
    return merged_now


def weight_before_merges(layer) -> torch.Tensor:
    """The base weight as it was before any adapter was merged into it."""
    W = layer.base_layer.weight.detach()
    for name in reversed(layer.merged_adapters):
        W = weight_without(layer, name, W)
    return W


def unmerge_weights(layer) -> list[str]:
    """Take every merged adapter out of the base weight, last merged first. -> their names."""
    names = []
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        layer.base_layer.weight.data.copy_(weight_without(layer, name, layer.base_layer.weight.detach()))
        layer._merge_norms.pop(name, None)
        names.append(name)
    return names


def mixed_rows(out: torch.Tensor, x: torch.Tensor, adapter_names: list[str], known, add) -> torch.Tensor:
    """Row b of the batch gets adapter adapter_names[b] ("__base__" or one this layer lacks: none).

    `add(out_rows, x_rows, name)` returns the rows' output with that adapter applied.
    """
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]}")
    for name in dict.fromkeys(adapter_names):
        if name == "__base__" or name not in known:
            continue
        rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
        out = out.index_copy(0, rows, add(out.index_select(0, rows), x.index_select(0, rows), name).to(out.dtype))
    return out
