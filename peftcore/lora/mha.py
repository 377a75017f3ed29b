"""LoRA on torch.nn.MultiheadAttention, laid out as HF PEFT's lora.MultiheadAttention (0.21.2), so attention
adapters move between the two libraries key for key and give the same outputs.

nn.MultiheadAttention has no linear layer to wrap for its input projection: its forward hands the packed
`in_proj_weight` (3 * embed_dim, embed_dim) and `out_proj.weight` straight to F.multi_head_attention_forward (it
never calls out_proj). So, as in PEFT, LoRA goes on both weights:
  in_proj:  lora_A (r, embed_dim), lora_B (3 * embed_dim, r) on this layer,  W_in' = W_in + s * B A
  out_proj: a LoraLinear (LoraOutProj) put in place of `base_layer.out_proj`, W_out' = W_out + s * B' A'
The forward runs the attention's own forward through torch.func.functional_call with both weights replaced by
their adapted versions (nothing in the module changes, autograd reaches the factors), where PEFT merges the
adapters into the weights before every forward and unmerges them after. Keys, in memory (on disk without
`.default`): `attn.lora_A.default.weight`, `attn.lora_B.default.weight`, `attn.base_layer.in_proj_weight`,
`attn.base_layer.out_proj.lora_A.default.weight`, `attn.base_layer.out_proj.base_layer.weight`.

PEFT 0.21.2 adds out_proj's delta twice, in its forward and in merge (its merge writes W + dW into the weight,
then calls out_proj's own merge, which adds dW again; unmerge takes both out): the function it trains is
W_out + 2 s B' A', and its gradient reaches the factors through one of the two (the second is added to `.data`).
`LoraMultiheadAttention.out_proj_twice = True` (the default) computes exactly that, W_out + dW + dW.detach(), so
adapter files give the same outputs and gradients in both libraries; False gives W_out + dW (the fix proposed in
huggingface/peft#3774). With several active adapters PEFT's gradient reaches the last one's factors only (each
merge detaches the weight before); here it reaches every active adapter's.

Refused, as in PEFT: _qkv_same_embed_dim=False (kdim / vdim != embed_dim: no packed in_proj_weight), an out_proj
that is not an nn.Linear, use_dora, mixed adapter_names batches (TypeError, as PEFT's). Refused here, where PEFT
builds something broken: the weight factorisations (PiSSA / OLoRA: PEFT fails with an AttributeError), lora_bias
(PEFT never applies in_proj's bias and adds out_proj's to `.data`, untrained), an out_proj with LoRA of its own
already, fan_in_fan_out=True (PEFT would transpose out_proj's delta). lora_dropout is accepted and, as in PEFT,
has no effect (the update W + s*B*A has no input path to drop): a warning says so.

Inside nn.TransformerEncoderLayer (self_attn), whose eval-mode fused path reads the attention's weights itself and so
runs without LoRA under PEFT, the adapters stay in: see `_qkv_same_embed_dim`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from peftcore.config import LoraConfig
from peftcore.lora.init import PLAIN_INITS, init_adapter
from peftcore.lora.layer import LoraLinear, adapter_dtype, delete_from, init_adapter_state, lora_scaling

# what PEFT's wrapper reads through to the attention (nn.TransformerEncoderLayer reads several of them)
BASE_ATTRIBUTES = ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "in_proj_weight",
                   "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "merge_masks")


class LoraOutProj(LoraLinear):
    """The out_proj of an nn.MultiheadAttention under LoRA. The attention never calls it: it reads `.weight` and
    `.bias`, which answer the base layer's (as PEFT's layers do), and LoraMultiheadAttention's forward replaces that
    weight by W + s*B*A. Targeted alone (without its attention), its adapter therefore has no effect, as in PEFT."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """As LoraLinear's, silently past what its attention merged already (a model-wide merge reaches this layer
        after its attention's merge did it)."""
        names = [n for n in adapter_names or self.active_adapters if n not in self.merged_adapters]
        if names:
            super().merge(names)


def refusal(config: LoraConfig, r: int) -> str | None:
    """Why adapter options cannot apply to an nn.MultiheadAttention (None: they can)."""
    if config.use_dora:
        return "use_dora=True (HF PEFT does not support DoRA here either)"
    if config.lora_bias:
        return "lora_bias=True (HF PEFT never applies the in_proj bias and does not train the out_proj one)"
    if config.fan_in_fan_out:
        return "fan_in_fan_out=True (its weights are stored (out, in))"
    if config.init_lora_weights not in PLAIN_INITS:
        return f"init_lora_weights={config.init_lora_weights!r} (a weight factorisation; use True, False or 'gaussian')"
    if r <= 0:
        return f"r={r} (the rank must be positive)"
    return None


def check_attention(base: nn.Module) -> None:
    """PEFT's structural limits, raised before anything is wrapped."""
    if not getattr(base, "_qkv_same_embed_dim", True):
        raise ValueError(f"LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one packed in_proj_weight), "
                         f"as in HF PEFT; this one has embed_dim={base.embed_dim}, kdim={base.kdim}, vdim={base.vdim}")
    if isinstance(base.out_proj, LoraLinear):
        raise ValueError("this nn.MultiheadAttention's out_proj has LoRA adapters already (target_modules named it "
                         "alone, where they have no effect); target the attention only (HF PEFT refuses too)")
    if not isinstance(base.out_proj, nn.Linear):
        raise TypeError(f"LoRA on nn.MultiheadAttention needs an nn.Linear out_proj, not a "
                        f"{type(base.out_proj).__name__} (as in HF PEFT)")


class LoraMultiheadAttention(nn.Module):
    """LoRA adapters on an nn.MultiheadAttention's in_proj_weight and (through LoraOutProj) its out_proj."""

    out_proj_twice = True  # PEFT 0.21.2's out_proj update, W + 2 s B A with one gradient path; see the docstring

    def __init__(self, base_layer: nn.MultiheadAttention):
        super().__init__()
        check_attention(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim  # PEFT's names
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        init_adapter_state(self)

    def __getattr__(self, name: str):
        """The attention's attributes read through, as PEFT's wrapper's properties; `out_proj` is the plain base
        projection (PEFT's), also before the first adapter put a LoraOutProj around it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in BASE_ATTRIBUTES:
                return getattr(self.base_layer, name)
            if name == "out_proj":
                out_proj = self.base_layer.out_proj
                return out_proj.base_layer if isinstance(out_proj, LoraOutProj) else out_proj
            raise

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """The attention's, but False while this layer's forward adds adapters: nn.TransformerEncoderLayer's fused
        eval path reads in_proj_weight and out_proj.weight itself and runs the attention without the adapters (under
        HF PEFT it does: LoRA is lost in eval); this flag is the one that sends it through this forward instead."""
        return self.base_layer._qkv_same_embed_dim and not self.adds_adapters()

    @property
    def fan_in_fan_out(self) -> bool:
        return False

    def adds_adapters(self) -> bool:
        """Whether the forward adds adapters to the weights (some active, none merged, not disabled)."""
        active = any(n in self.lora_A for n in self.active_adapters)
        return active and not (self.disable_adapters or self.merged_adapters)

    def get_param(self) -> torch.Tensor:
        """The packed weight this layer's own factors adapt (what a safe_merge check adds the delta to)."""
        return self.base_layer.in_proj_weight

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        """In PEFT's order of draws: a new wrapper makes out_proj's factors, then in_proj's, then out_proj's again
        (PEFT's Linear and then its update_layer both make them), a later adapter in_proj's then out_proj's; so one
        seed gives both libraries the same adapter."""
        why = refusal(config, r)
        if why:
            raise ValueError(f"LoRA on nn.MultiheadAttention does not work with {why}")
        if config.lora_dropout:
            warnings.warn(f"lora_dropout={config.lora_dropout} has no effect on nn.MultiheadAttention (as in HF PEFT): "
                          "its update W + s*B*A is added to the weights, with no input path to drop")
        base = self.base_layer
        if not isinstance(base.out_proj, LoraOutProj):
            base.out_proj = LoraOutProj(base.out_proj)
            base.out_proj.add_adapter(name, config, r, alpha, autocast_dtype)
        weight = base.out_proj.base_layer.weight  # PEFT moves the factors to out_proj's device and dtype
        kw = dict(device=weight.device, dtype=adapter_dtype(weight.dtype, autocast_dtype))
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Identity()
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, config.use_rslora)
        init_adapter(self, name, config.init_lora_weights)
        base.out_proj.add_adapter(name, config, r, alpha, autocast_dtype)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        delete_from(self, name, (self.lora_A, self.lora_B, self.lora_dropout))
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, LoraOutProj):
            out_proj.delete_adapter(name)

    def adapter_params(self, name: str):
        """in_proj's factors. out_proj's belong to the LoraOutProj inside, a LoRA layer of its own that every walk
        over a model's LoRA layers reaches too (so no parameter is listed twice)."""
        for container in (self.lora_A, self.lora_B):
            if name in container:
                yield from container[name].parameters()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:
            raise TypeError("LoRA on nn.MultiheadAttention cannot run a mixed adapter_names batch (HF PEFT's "
                            "TypeError too): run one adapter (set_adapter) per batch")
        if self.disable_adapters and self.merged_adapters:
            raise RuntimeError("adapters are merged into the base weight; unmerge before disabling them")
        if not self.adds_adapters():
            out = self.base_layer(query, *args, **kwargs)
        else:
            if self.base_layer.out_proj.active_adapters != self.active_adapters:
                raise ValueError(f"the out_proj of this nn.MultiheadAttention runs adapters "
                                 f"{self.base_layer.out_proj.active_adapters} but the attention {self.active_adapters}"
                                 "; set them through the model (set_adapter), which sets both")
            weights = self.adapted_weights([n for n in self.active_adapters if n in self.lora_A])
            out = torch.func.functional_call(self.base_layer, weights, (query, *args), kwargs, tie_weights=False)
        attn_output, attn_weights = out  # PEFT casts both back to the query's dtype
        return attn_output.to(query.dtype), None if attn_weights is None else attn_weights.to(query.dtype)

    def adapted_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{key: W + the adapters' updates} for in_proj_weight and out_proj's weight, added one adapter after the
        other (PEFT's order of additions, so the sums round alike)."""
        out_proj = self.base_layer.out_proj
        W_in, W_out = self.base_layer.in_proj_weight, out_proj.base_layer.weight
        for name in names:
            W_in = W_in + self.delta_weight(name).to(W_in.dtype)
            delta = out_proj.delta_weight(name)  # the adapter's dtype
            W_out = W_out + delta.to(W_out.dtype)
            if self.out_proj_twice:  # PEFT's second add: lora.Linear.merge's `.data += delta`, in the wider dtype
                W_out = (W_out + delta.detach()).to(W_out.dtype)
        return {"in_proj_weight": W_in, "out_proj.base_layer.weight": W_out}

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in in_proj_weight's layout (3 * embed_dim, embed_dim); fp16 / bf16 factors on the CPU multiply
        in fp32 (PEFT's get_delta_weight). out_proj's is its LoraOutProj's delta_weight."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        half_on_cpu = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
        delta = (B.float() @ A.float()) * self.scaling[name] if half_on_cpu else (B @ A) * self.scaling[name]
        return delta.to(B.dtype)

    def check_mergeable(self, names: list[str]) -> None:
        """A dense in_proj always takes its adapters (no lora_bias here); out_proj checks its own."""
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, LoraOutProj):
            out_proj.check_mergeable(names)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """in_proj += s*B*A, and out_proj's adapter into its weight (twice, with out_proj_twice), with PEFT's
        roundings: its own W + dW in the weight's dtype, then lora.Linear.merge's `.data += dW` in the wider one.
        out_proj's merged_adapters records it (a model-wide merge reaching out_proj after this skips it)."""
        names = adapter_names or self.active_adapters
        self.check_mergeable(names)
        W_in, out_proj = self.base_layer.in_proj_weight, self.base_layer.out_proj
        for name in names:
            if name in self.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
                warnings.warn(f"adapter {name!r} is already merged into this nn.MultiheadAttention: nothing to do")
                continue
            if name not in self.lora_A:
                continue
            W_out, delta = out_proj.base_layer.weight, out_proj.delta_weight(name).detach()
            with torch.no_grad():
                W_in.data += self.delta_weight(name).to(W_in.dtype)
                if self.out_proj_twice:
                    W_out.data += delta.to(W_out.dtype)
                W_out.data += delta
            out_proj.merged_adapters.append(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Every merged adapter out again, last merged first, in PEFT's order: in_proj's (and out_proj's first
        copy) per adapter, then out_proj's own merges."""
        W_in, out_proj = self.base_layer.in_proj_weight, self.base_layer.out_proj
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                W_in.data -= self.delta_weight(name).to(W_in.dtype)
                if self.out_proj_twice:
                    W_out = out_proj.base_layer.weight
                    W_out.data -= out_proj.delta_weight(name).to(W_out.dtype)
        if isinstance(out_proj, LoraOutProj):
            out_proj.unmerge()


def attention_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The nn.MultiheadAttention (or its LoRA layer) whose out_proj module `name` is, else None."""
    parent_name, _, child = name.rpartition(".")
    if child != "out_proj":
        return None
    parent = model.get_submodule(parent_name)
    return parent if isinstance(parent, (nn.MultiheadAttention, LoraMultiheadAttention)) else None


def lone_out_proj(module: nn.Linear, name: str) -> LoraOutProj:
    """LoRA on an attention's out_proj without the attention (target_modules naming it, "all-linear"): PEFT's
    layer, whose adapter the attention's forward never runs; a warning says so."""
    warnings.warn(f"LoRA on {name} has no effect: nn.MultiheadAttention reads its out_proj's weight and never calls "
                  "it (as in HF PEFT); target the attention itself for LoRA on in_proj and out_proj")
    return LoraOutProj(module)
