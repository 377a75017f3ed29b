"""Wrap the modules a LoHaConfig / LoKrConfig targets: one walk over the model, LoRA's matching rules.

Matching is peftcore.lora.inject's (HF PEFT's, the same for every tuner): a list entry equals a module's name or
its ending after a ".", a str is a full-match regex, "all-linear" is every linear but the output head;
exclude_modules, modules_to_save names and layers_to_transform / layers_pattern filter as in PEFT.
rank_pattern / alpha_pattern pick each module's r and alpha. A module already wrapped by this method takes
the new adapter beside its others; the bases are nn.Linear, nn.Conv1d and nn.Conv2d (PEFT's LyCORIS layers).
"""
from __future__ import annotations

from torch import nn

from peftcore.lora.inject import all_linear_names, is_target, pattern_value, regex_hint
from peftcore.lora.modules_to_save import set_submodule, walk_unwrapped
from peftcore.lycoris.common import SUPPORTED_BASES, check_base
from peftcore.lycoris.config import LoHaConfig, LoKrConfig
from peftcore.lycoris.loha import LoHaLayer
from peftcore.lycoris.lokr import LoKrLayer

LYCORIS_LAYERS = (LoHaLayer, LoKrLayer)


def inject_loha(model: nn.Module, config: LoHaConfig, adapter_name: str,
                autocast_adapter_dtype: bool = True) -> dict[str, LoHaLayer]:
    """Wrap every module `config` targets in a LoHaLayer (or add the adapter to one). -> {name: layer}.
    autocast_adapter_dtype: float32 factors on half-precision layers (lora.layer.adapter_dtype)."""
    return inject(model, config, adapter_name, LoHaLayer, autocast_adapter_dtype)


def inject_lokr(model: nn.Module, config: LoKrConfig, adapter_name: str,
                autocast_adapter_dtype: bool = True) -> dict[str, LoKrLayer]:
    """Wrap every module `config` targets in a LoKrLayer (or add the adapter to one). -> {name: layer}."""
    return inject(model, config, adapter_name, LoKrLayer, autocast_adapter_dtype)


def inject(model: nn.Module, config, adapter_name: str, layer_cls: type, autocast_adapter_dtype: bool) -> dict:
    method = layer_cls.__name__.removesuffix("Layer")
    if config.target_modules is None:
        raise ValueError(f"{type(config).__name__}.target_modules is required, e.g. ['q_proj', 'v_proj'] or "
                         "'all-linear' (peftcore has no per-architecture defaults)")
    if config.target_modules == "all-linear":
        config.target_modules = all_linear_names(model, config.task_type, LYCORIS_LAYERS)
    found = [(name, module) for name, module in walk_unwrapped(model) if name and is_target(name, config)]
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
                         f"Candidates: {', '.join(candidate_names(model)) or 'none'}"
                         + regex_hint(model, config.target_modules))
    for name, module in found:  # every target is checked before any is wrapped: no half-injected model
        if not isinstance(module, layer_cls):
            check_wrappable(module, name, method)
    wrapped = {}
    for name, module in found:
        layer = module if isinstance(module, layer_cls) else layer_cls(module)
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.alpha)
        layer.add_adapter(adapter_name, config, r, alpha, autocast_adapter_dtype)
        if layer is not module:
            set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def check_wrappable(module: nn.Module, name: str, method: str) -> None:
    """One adapter kind per module (PEFT nests kinds only in its mixed models), and a base PEFT's LyCORIS takes."""
    if hasattr(module, "base_layer"):
        raise TypeError(f"target {name!r} is already a {type(module).__name__} (another adapter kind); {method} "
                        "wraps plain layers only: leave it out of target_modules, or unload the other adapter first")
    check_base(module, name, method)


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules LoHa / LoKr could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in walk_unwrapped(model)
                   if name and isinstance(module, (*SUPPORTED_BASES, *LYCORIS_LAYERS))})
