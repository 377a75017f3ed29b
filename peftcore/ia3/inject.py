"""Find the modules an IA3Config targets and wrap them: one plain walk over `named_modules()`.

Matching follows HF PEFT's IA3Model so a config means the same in both libraries:
  target_modules / exclude_modules: a list matches a full name or a "." + name ending, a str is re.fullmatch,
    "all-linear" every nn.Linear / Conv1D but the output head (peftcore.lora.inject's rules; IA3Config has no
    layers_to_transform / layers_pattern in PEFT 0.21.2, so there is no layer filter);
  feedforward_modules: a str is re.fullmatch, a list entry matches any name ENDING with it (no "." boundary:
    PEFT's `key.endswith(entry)`), so "proj" would make every *_proj a feedforward module;
  target_modules / feedforward_modules None: PEFT's per-model_type defaults (DEFAULT_TARGETS), else an error.
Dispatch as PEFT's _create_new_module: nn.Conv2d / nn.Conv3d -> IA3Conv; nn.Linear, GPT-2's Conv1D (ours or
transformers') and peftcore's QuantLinear -> IA3Linear; anything else is refused.
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from peftcore.ia3.config import IA3Config
from peftcore.ia3.layer import CONV_TYPES, IA3_LAYERS, IA3Conv, IA3Linear
from peftcore.lora.inject import (
    all_linear_names,
    is_linear,
    match_fan_in_fan_out,
    matches,
    regex_hint,
)
from peftcore.lora.modules_to_save import ModulesToSave, set_submodule, walk_unwrapped
from peftcore.lora.registry import LORA_LAYERS

# PEFT 0.21.2's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING, for the
# model types peftcore.models loads: model_type -> (target_modules, feedforward_modules)
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


def model_type(model: nn.Module) -> str | None:
    """model.config.model_type, for transformers' and peftcore's models (a dict config too); None if absent."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def fill_defaults(model: nn.Module, config: IA3Config) -> None:
    """PEFT's IA3Model._prepare_adapter_config: a None target_modules / feedforward_modules takes the model type's
    defaults, written into the config (PEFT saves what it used); no defaults for the type is an error."""
    kind = model_type(model)
    defaults = DEFAULT_TARGETS.get(kind)
    known = ", ".join(sorted(DEFAULT_TARGETS))
    for field in ("target_modules", "feedforward_modules"):
        if getattr(config, field) is not None:
            continue
        if defaults is None:
            raise ValueError(f"IA3Config.{field} is required for a {type(model).__name__} (model_type {kind!r}; "
                             f"defaults exist for {known}), e.g. target_modules=['k_proj', 'v_proj', 'down_proj'], "
                             "feedforward_modules=['down_proj'] ([] for none), as in HF PEFT")
        setattr(config, field, list(defaults[field == "feedforward_modules"]))


def is_target(name: str, config: IA3Config) -> bool:
    """PEFT's check_target_module_exists for IA3Config (which has no layer filter)."""
    if matches(name, config.exclude_modules):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
        return False  # PEFT never adapts a modules_to_save module: the copies and the adapter would conflict
    return matches(name, config.target_modules)


def is_feedforward(name: str, config: IA3Config) -> bool:
    """PEFT's _check_target_module_feedforward: str -> fullmatch, list -> plain suffix (no "." boundary)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(entry) for entry in ff or ())


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (*CONV_TYPES, *IA3_LAYERS))


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules IA3 could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in walk_unwrapped(model) if name and is_adaptable(m)})


def expand_all_linear(model: nn.Module, config: IA3Config) -> list[str]:
    """PEFT's "all-linear": every linear (or the IA3Linear around one) but the output head, by full name."""
    return all_linear_names(model, config.task_type, (IA3Linear,))


def check_wrappable(name: str, module: nn.Module) -> None:
    """Raise for a target IA3 cannot adapt (checked for every target before the first one is swapped)."""
    if isinstance(module, IA3_LAYERS) or is_linear(module) or isinstance(module, CONV_TYPES):
        return
    kind = type(module).__name__
    if isinstance(module, (*LORA_LAYERS, ModulesToSave)):
        raise TypeError(f"target {name!r} is a {kind} of another adapter already; one adapter method per module "
                        "(as in HF PEFT): leave it out of target_modules, or start from the base model")
    raise TypeError(f"target {name!r} is a {kind}; (IA)^3 adapts nn.Linear, GPT-2's Conv1D (peftcore's or "
                    "transformers'), peftcore's QuantLinear, nn.Conv2d and nn.Conv3d (as HF PEFT's IA3)")


def wrap(module: nn.Module, feedforward: bool) -> nn.Module:
    if isinstance(module, CONV_TYPES):
        return IA3Conv(module, feedforward)
    return IA3Linear(module, feedforward)


def no_match_error(model: nn.Module, config: IA3Config) -> ValueError:
    excluded = f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else ""
    return ValueError(f"target_modules={config.target_modules!r}{excluded} matched no module of "
                      f"{type(model).__name__}. Candidates: {', '.join(candidate_names(model)) or 'none'}"
                      + regex_hint(model, config.target_modules))


def inject_ia3(model: nn.Module, config: IA3Config, adapter_name: str,
               autocast_adapter_dtype: bool = True) -> dict[str, nn.Module]:
    """Wrap every targeted module (or add the adapter to the (IA)^3 layer already there). -> {name: ia3 layer}.
    autocast_adapter_dtype: float32 vectors on half-precision layers (lora.layer.adapter_dtype). As PEFT, this
    writes into `config` what it resolved: default targets, "all-linear" expanded, fan_in_fan_out from the layers."""
    fill_defaults(model, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = expand_all_linear(model, config)
    found = [(name, module) for name, module in walk_unwrapped(model) if name and is_target(name, config)]
    if not found:
        raise no_match_error(model, config)
    for name, module in found:
        check_wrappable(name, module)
    wrapped = {}
    for name, module in found:
        feedforward = is_feedforward(name, config)
        layer = module if isinstance(module, IA3_LAYERS) else wrap(module, feedforward)
        if layer is module and layer.is_feedforward != feedforward:
            # PEFT's update_layer keeps the layer's kind too: the vector's shape must not differ per adapter
            warnings.warn(f"{name} is a{' feedforward' if layer.is_feedforward else 'n output'} (IA)^3 layer since "
                          f"its first adapter; adapter {adapter_name!r} follows it (as in HF PEFT), not its config's "
                          f"feedforward_modules={config.feedforward_modules!r}")
        if isinstance(layer, IA3Linear):
            match_fan_in_fan_out(name, layer.base_layer, config)
        layer.add_adapter(adapter_name, config, autocast_adapter_dtype)
        if layer is not module:
            set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped
