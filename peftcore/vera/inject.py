"""Find the modules a VeraConfig targets, draw the model's shared projections once, and wrap the targets.

Matching is LoRA's (peftcore.lora.inject, HF PEFT's rules): a list entry matches a full name or its ending,
a str is a full-match regex, "all-linear" takes every linear but the output head; layers_to_transform /
layers_pattern filter by block index; modules_to_save are never targets. PEFT's VeraConfig has no
exclude_modules, so neither has ours. VeRA adapts nn.Linear and GPT-2's Conv1D (and our QuantLinear, unmerged).

Where the projections live (PEFT's layout): `holder.vera_A` / `holder.vera_B`, BufferDicts keyed by adapter
name, with every VeraLinear holding the same two dicts as children. In PEFT the holder is the VeraModel
(`peft_model.base_model`), whose `.model` is the user's model: keys `base_model.vera_A.<name>` beside
`base_model.model.<path>.vera_A.<name>`. Persistent (in the state dict) only when save_projection=True.
"""
from __future__ import annotations

import types

from torch import nn

from peftcore.lora.inject import (
    all_linear_names,
    is_linear,
    is_target,
    match_fan_in_fan_out,
    regex_hint,
)
from peftcore.lora.layer import linear_features
from peftcore.lora.modules_to_save import set_submodule, walk_unwrapped
from peftcore.vera.config import VeraConfig
from peftcore.vera.layer import BufferDict, VeraLinear, check_fits, make_projections


def inject_vera(model: nn.Module, config: VeraConfig, adapter_name: str, holder: nn.Module | None = None,
                autocast_adapter_dtype: bool = True) -> dict[str, VeraLinear]:
    """Wrap every targeted module in a VeraLinear (or add the adapter to one wrapped already). -> {name: layer}.

    `holder`: the module that keeps the shared vera_A / vera_B (default: `model`; a PeftModel passes its
    base_model so the keys read as PEFT's). Everything is checked before the model changes."""
    if config.target_modules is None:
        raise ValueError("VeraConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    holder = model if holder is None else holder
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_names(model, config.task_type, (VeraLinear,))  # PEFT saves them too
    targets = find_targets(model, config)
    vera_A, vera_B = shared_dicts(holder, config)
    check_targets_share(targets, vera_A, vera_B)
    if adapter_name in vera_A:
        raise ValueError(f"the model has a VeRA adapter named {adapter_name!r} already: pick another name, or "
                         "delete that adapter first")
    fresh = not len(vera_A)
    projection = next_projection(vera_A, vera_B, config, targets)
    for _, module in targets:
        check_fits(*projection, config.r, *dims(module))
    register_shared(holder, vera_A, vera_B)
    if fresh:
        vera_A.prng_key = config.projection_prng_key
    vera_A[adapter_name], vera_B[adapter_name] = projection
    wrapped = {}
    for name, module in targets:
        layer = module if isinstance(module, VeraLinear) else VeraLinear(module, vera_A, vera_B)
        match_fan_in_fan_out(name, layer.base_layer, config)
        layer.add_adapter(adapter_name, config, autocast_adapter_dtype)
        if layer is not module:
            set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def check_targets_share(targets, vera_A: BufferDict, vera_B: BufferDict) -> None:
    """Layers wrapped already must hold the holder's dicts (a layer reads its projections from its own)."""
    for name, module in targets:
        if isinstance(module, VeraLinear) and (module.vera_A is not vera_A or module.vera_B is not vera_B):
            raise ValueError(f"{name} holds the VeRA projections of another holder module: pass the holder the "
                             "model's first VeRA adapter was injected with")


def matching_view(config: VeraConfig) -> types.SimpleNamespace:
    """The fields lora.inject.is_target reads: VeRA's, plus the exclude_modules PEFT's VeraConfig lacks."""
    return types.SimpleNamespace(target_modules=config.target_modules, exclude_modules=None,
                                 modules_to_save=config.modules_to_save, layers_to_transform=config.layers_to_transform,
                                 layers_pattern=config.layers_pattern)


def find_targets(model: nn.Module, config: VeraConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every target, in named_modules order; raises for none, or for one VeRA cannot adapt."""
    view = matching_view(config)
    targets = [(name, m) for name, m in walk_unwrapped(model) if name and is_target(name, view)]
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
                         f"Candidates: {', '.join(linear_candidates(model)) or 'none'}"
                         + regex_hint(model, config.target_modules))
    for name, module in targets:
        if not (isinstance(module, VeraLinear) or is_linear(module)):
            raise TypeError(f"target {name!r} is a {type(module).__name__}; VeRA adapts nn.Linear and GPT-2's Conv1D "
                            "(peftcore's or transformers'), as in HF PEFT: leave it out of target_modules")
    return targets


def linear_candidates(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules VeRA could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in walk_unwrapped(model)
                   if name and (is_linear(m) or isinstance(m, VeraLinear))})


def dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a target, wrapped or not."""
    return linear_features(module.base_layer if isinstance(module, VeraLinear) else module)


def shared_dicts(holder: nn.Module, config: VeraConfig) -> tuple[BufferDict, BufferDict]:
    """The holder's vera_A / vera_B dicts; made empty for the first adapter. Later adapters must agree with the
    first on save_projection and projection_prng_key (PEFT's _check_new_adapter_config)."""
    if isinstance(holder, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"the VeRA projections cannot live on a {type(holder).__name__}, which would run or list them "
                        "with its layers: pass holder=, a module that wraps the model (PEFT's is its VeraModel)")
    # _modules, not getattr: a holder like lora_backend.LoraModel reads unknown attributes through to its model
    vera_A, vera_B = holder._modules.get("vera_A"), holder._modules.get("vera_B")
    if vera_A is None and vera_B is None:
        return BufferDict(config.save_projection), BufferDict(config.save_projection)
    if not isinstance(vera_A, BufferDict) or not isinstance(vera_B, BufferDict):
        raise TypeError(f"{type(holder).__name__} has a vera_A / vera_B that is not VeRA's BufferDict pair")
    if vera_A.persistent != config.save_projection:
        raise ValueError(f"save_projection={config.save_projection} but the model's other VeRA adapters have "
                         f"save_projection={vera_A.persistent}: the projections are saved for all adapters or none")
    if vera_A.prng_key is not None and vera_A.prng_key != config.projection_prng_key and len(vera_A):
        raise ValueError(f"projection_prng_key={config.projection_prng_key} but the model's VeRA projections were "
                         f"drawn with {vera_A.prng_key}: every VeRA adapter of a model shares them, so use that key")
    return vera_A, vera_B


def next_projection(vera_A: BufferDict, vera_B: BufferDict, config: VeraConfig, targets) -> tuple:
    """The (vera_A, vera_B) tensors the new adapter uses. The first adapter draws them at the largest in / out
    features among its targets (PEFT's _find_dim); later ones reuse the first entry's tensors, as PEFT's
    update_layer (so an adapter added later cannot reach wider layers: check_fits says so)."""
    if len(vera_A):
        return next(iter(vera_A.values())), next(iter(vera_B.values()))
    in_max = max(dims(module)[0] for _, module in targets)
    out_max = max(dims(module)[1] for _, module in targets)
    return make_projections(config.r, in_max, out_max, config.projection_prng_key)


def register_shared(holder: nn.Module, vera_A: BufferDict, vera_B: BufferDict) -> None:
    """Put the dicts on the holder as `vera_A` / `vera_B` (a no-op when they are there already)."""
    if holder._modules.get("vera_A") is not vera_A:
        holder.vera_A, holder.vera_B = vera_A, vera_B
