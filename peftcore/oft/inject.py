"""Find the modules an OFTConfig targets and wrap them: one plain walk over the model, with LoRA's matching rules
(peftcore.lora.inject: exact name or ".suffix" for a list, full-match regex for a str, exclude_modules,
layers_to_transform / layers_pattern; modules_to_save are no targets), which are HF PEFT's BaseTuner rules and so
OFT's there too.

Dispatch as HF PEFT 0.21.2's OFT: nn.Linear (and peftcore's QuantLinear, forward only) -> OftLinear,
nn.Embedding -> OftEmbedding. GPT-2's Conv1D is refused, as PEFT's OFT refuses it; nn.Conv2d is refused too
(see CONV2D_REFUSAL). A module already wrapped by OFT takes the new adapter beside its others.
"""
from __future__ import annotations

import warnings

from torch import nn

from peftcore.lora.inject import all_linear_names, is_target, regex_hint
from peftcore.lora.layer import is_conv1d
from peftcore.lora.modules_to_save import set_submodule, walk_unwrapped
from peftcore.models.quantized import QuantLinear
from peftcore.oft.config import OFTConfig
from peftcore.oft.layer import OFT_LAYERS, OftEmbedding, OftLinear

# Why not Conv2d: PEFT 0.21.2's OFT Conv2d rotates stride-1 patches of the input and folds them back with F.fold,
# which sums overlapping patches, so for kernels above 1x1 even the identity rotation does not give the base conv
# (measured: 4.5 off on a 3x3 conv at init), and its merged weight does not compute what its forward does.
CONV2D_REFUSAL = ("OFT on nn.Conv2d is not supported by peftcore: HF PEFT 0.21.2's OFT Conv2d forward folds "
                  "overlapping patches back by summing them, so it does not equal the base conv even at identity init "
                  "(kernels above 1x1); target the model's linear layers")


def inject_oft(model: nn.Module, config: OFTConfig, adapter_name: str,
               autocast_adapter_dtype: bool = True) -> dict[str, nn.Module]:
    """Wrap every targeted module (or add the adapter to an existing OFT layer). -> {name: oft layer}.
    autocast_adapter_dtype: float32 adapters on half-precision layers (lora.layer.adapter_dtype)."""
    if config.target_modules is None:
        raise ValueError("OFTConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    if config.target_modules == "all-linear":
        config.target_modules = all_linear_names(model, config.task_type, (OftLinear,))
    found = [(name, module) for name, module in walk_unwrapped(model) if name and is_target(name, config)]
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
                         f"Candidates: {', '.join(candidate_names(model)) or 'none'}"
                         + regex_hint(model, config.target_modules))
    layers = {name: module if isinstance(module, OFT_LAYERS) else wrap(module, name) for name, module in found}
    for name, module in found:  # every target is checked (wrap raises) before the model changes
        layer = layers[name]
        match_fan_in_fan_out(name, layer, config)
        layer.add_adapter(adapter_name, config, autocast_adapter_dtype)
        if layer is not module:
            set_submodule(model, name, layer)
    return layers


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules OFT could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in walk_unwrapped(model)
                   if name and isinstance(module, (nn.Linear, nn.Embedding, QuantLinear, *OFT_LAYERS))})


def wrap(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return OftEmbedding(module)
    if isinstance(module, (nn.Linear, QuantLinear)):
        return OftLinear(module)
    if is_conv1d(module):
        raise TypeError(f"target {name!r} is GPT-2's Conv1D (weight stored (in, out)), which OFT does not adapt "
                        "(HF PEFT's OFT refuses it too); use LoRA with fan_in_fan_out=True for it")
    if isinstance(module, nn.Conv2d):
        raise TypeError(f"target {name!r}: {CONV2D_REFUSAL}")
    raise TypeError(f"target {name!r} is a {type(module).__name__}; OFT adapts nn.Linear, quantized linears and "
                    "nn.Embedding")


def match_fan_in_fan_out(name: str, layer: nn.Module, config: OFTConfig) -> None:
    """PEFT's _create_new_module: fan_in_fan_out=True on an nn.Linear is a mistake it corrects, with a warning."""
    if isinstance(layer, OftLinear) and config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out is True but {name} is an nn.Linear: setting it to False")
        config.fan_in_fan_out = False
