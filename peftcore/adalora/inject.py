"""Find the modules an AdaLoraConfig targets and wrap them: one plain walk over `named_modules()`.

Matching is LoRA's (peftcore.lora.inject: exact name, ".suffix", full-match regex, "all-linear", exclude_modules,
layers_to_transform / layers_pattern; modules_to_save are never targets), as PEFT's AdaLoraModel inherits
LoraModel's. Every target starts at init_r (rank_pattern here is AdaLoRA's mask, not LoRA's per-module ranks).
Dispatch as PEFT's AdaLoraModel._create_new_module: nn.Linear, GPT-2's Conv1D and peftcore's QuantLinear ->
AdaLoraLinear; nn.Conv2d -> AdaLoraConv2d; anything else (embeddings too) is refused.
"""
from __future__ import annotations

from torch import nn

from peftcore.adalora.config import AdaLoraConfig
from peftcore.adalora.layer import ADALORA_LAYERS, AdaLoraConv2d, AdaLoraLinear
from peftcore.lora.inject import all_linear_names, is_linear, is_target, match_fan_in_fan_out, regex_hint
from peftcore.lora.modules_to_save import set_submodule, walk_unwrapped


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Conv2d, *ADALORA_LAYERS))


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules AdaLoRA could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in walk_unwrapped(model) if name and is_adaptable(m)})


def find_targets(model: nn.Module, config: AdaLoraConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every target, in named_modules order; raises for none, or for one AdaLoRA cannot adapt."""
    found = [(name, m) for name, m in walk_unwrapped(model) if name and is_target(name, config)]
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
                         f"Candidates: {', '.join(candidate_names(model)) or 'none'}"
                         + regex_hint(model, config.target_modules))
    for name, module in found:
        if not is_adaptable(module):
            raise TypeError(f"target {name!r} is a {type(module).__name__}; AdaLoRA adapts nn.Linear, GPT-2's Conv1D "
                            "(peftcore's or transformers'), peftcore's QuantLinear and nn.Conv2d, as HF PEFT's: "
                            "leave it out of target_modules")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise TypeError(f"target {name!r} is a Conv2d with groups={module.groups}; AdaLoRA adapts groups=1 "
                            "convolutions only (HF PEFT's SVDConv2d cannot reshape its update otherwise)")
    return found


def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str,
                   autocast_adapter_dtype: bool = True) -> dict[str, nn.Module]:
    """Wrap every targeted module (or add the adapter to an AdaLoRA layer already there), each at init_r.
    -> {name: layer}. As PEFT, writes into `config` what it resolved ("all-linear" expanded, fan_in_fan_out)."""
    if config.target_modules is None:
        raise ValueError("AdaLoraConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model, config.task_type, (AdaLoraLinear,))
    wrapped = {}
    for name, module in find_targets(model, config):
        if isinstance(module, ADALORA_LAYERS):
            layer = module
        else:
            layer = AdaLoraConv2d(module) if isinstance(module, nn.Conv2d) else AdaLoraLinear(module)
        if isinstance(layer, AdaLoraLinear):
            match_fan_in_fan_out(name, layer.base_layer, config)
        layer.add_adapter(adapter_name, config, config.init_r, autocast_adapter_dtype)
        if layer is not module:
            set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped
