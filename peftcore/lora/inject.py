"""Find the modules a LoraConfig targets and wrap them: one plain walk over `named_modules()`.

Matching follows HF PEFT so a config means the same in both libraries:
  list target   -> the full name equals an entry or ends with "." + entry
  string target -> re.fullmatch against the full name
  "all-linear"  -> every nn.Linear / Conv1D except the output head (lm_head; classifier/score for SEQ_CLS)
  exclude_modules uses the same rules; layers_to_transform keeps only the listed block indices.
Dispatch by base type, as PEFT's dispatch_default: nn.Embedding -> LoraEmbedding, nn.Conv1d/2d/3d -> LoraConv,
nn.MultiheadAttention -> LoraMultiheadAttention (in_proj and out_proj; see mha), nn.Linear, GPT-2's Conv1D (ours or
transformers', see layer.is_conv1d) and quantized linears -> LoraLinear. An attention's out_proj named as well as the
attention is left to it; named alone it gets PEFT's LoRA layer that the attention never runs (with a warning).
target_parameters (bare nn.Parameters, PEFT's rules): after the modules, "<module>.<param>" matches a parameter
registered directly on a module (recurse=False) whose key equals an entry or ends with "." + entry; each gets a
ParamWrapper, several of one module nest (see param_wrapper).
"""
from __future__ import annotations

import re
import warnings

from torch import nn
from torch.nn.utils import parametrize

from peftcore.config import LoraConfig, TaskType
from peftcore.lora.conv import CONV_TYPES, LoraConv
from peftcore.lora.layer import LoraEmbedding, LoraLinear, is_conv1d
from peftcore.lora.mha import LoraMultiheadAttention, attention_owner, lone_out_proj
from peftcore.lora.modules_to_save import ModulesToSave, set_submodule, walk_unwrapped
from peftcore.lora.param_wrapper import ParamWrapper, check_shape, refusal
from peftcore.lora.registry import LORA_LAYERS
from peftcore.models.layers import Conv1D
from peftcore.models.quantized import QuantLinear

LINEAR_TYPES = (nn.Linear, Conv1D, QuantLinear)  # by type; transformers' Conv1D is matched by is_linear
SEQ_CLS_HEAD_NAMES = ("classifier", "score")  # PEFT's order, as its configs list them


def matches(name: str, targets: list[str] | str | None) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer-block index in a module name ("model.layers.3.mlp.up_proj" -> 3)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(found.group("idx")) if found else None


def pattern_value(name: str, patterns: dict, default):
    """rank_pattern / alpha_pattern: the first key k for which `(.*\\.)?(k)$` matches the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) or is_conv1d(module)


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.MultiheadAttention, *CONV_TYPES, *LORA_LAYERS))


def output_head_names(model: nn.Module, task_type) -> set[str]:
    heads = {"lm_head"}
    if task_type in (TaskType.SEQ_CLS, "SEQ_CLS"):
        heads |= set(SEQ_CLS_HEAD_NAMES)
    return {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in heads}


def expand_all_linear(model: nn.Module, config: LoraConfig) -> list[str]:
    return all_linear_names(model, config.task_type, (LoraLinear,))


def all_linear_names(model: nn.Module, task_type, wrappers: tuple[type, ...]) -> list[str]:
    """PEFT's "all-linear", by full name: every linear layer (GPT-2's Conv1D too) or one of `wrappers` (a method's
    layers: a second adapter finds the first one's) around one, but the output head (lm_head; score / classifier
    for SEQ_CLS). Every method expands it so."""
    heads = output_head_names(model, task_type)
    return sorted(name for name, module in walk_unwrapped(model) if name and name not in heads and (
        is_linear(module) or isinstance(module, wrappers) and is_linear(module.base_layer)))


def is_target(name: str, config: LoraConfig) -> bool:
    if matches(name, config.exclude_modules):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save):
        return False
    if isinstance(config.target_modules, str) or name in config.target_modules:
        return matches(name, config.target_modules)  # PEFT: a regex or a full name skips the layer filter
    if not matches(name, config.target_modules):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules LoRA could adapt: what the user probably meant."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in walk_unwrapped(model) if name and is_adaptable(m)})


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str,
                autocast_adapter_dtype: bool = True) -> dict[str, nn.Module]:
    """Wrap every targeted module (or add the adapter to an existing LoRA layer). -> {name: lora layer}.
    autocast_adapter_dtype: float32 adapters on half-precision layers (lora.adapter_dtype)."""
    if config.target_modules is None and not config.target_parameters:
        raise ValueError("LoraConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear' "
                         "(or target_parameters, e.g. ['experts.gate_up_proj'], for bare nn.Parameters)")
    if config.target_modules == "all-linear":
        config.target_modules = expand_all_linear(model, config)
    wrapped = inject_modules(model, config, adapter_name, autocast_adapter_dtype) if config.target_modules else {}
    params = inject_parameters(model, config, adapter_name, autocast_adapter_dtype) if config.target_parameters else {}
    if not wrapped and not params:
        if not config.target_modules and config.target_parameters:
            raise ValueError(no_parameter_matched(model, config))
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Candidates: {', '.join(candidate_names(model))}" + regex_hint(model, config.target_modules)
            + (f"; and {no_parameter_matched(model, config)}" if config.target_parameters else "")
        )
    if config.target_parameters and not params:  # PEFT warns too: the modules took the adapter
        warnings.warn(no_parameter_matched(model, config), RuntimeWarning)
    elif config.target_modules and not wrapped:
        warnings.warn(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__} "
                      "(target_parameters did); candidates: " + ", ".join(candidate_names(model)), RuntimeWarning)
    return {**wrapped, **params}


def inject_modules(model: nn.Module, config: LoraConfig, adapter_name: str,
                   autocast_adapter_dtype: bool) -> dict[str, nn.Module]:
    """The target_modules part of inject_lora. -> {name: lora layer}."""
    wrapped = {}
    for name, module in list(walk_unwrapped(model)):
        if not name or not is_target(name, config):
            continue
        owner = attention_owner(model, name)
        if isinstance(owner, LoraMultiheadAttention):  # PEFT adds a second adapter here that nothing runs
            warnings.warn(f"{name} is the out_proj of an nn.MultiheadAttention target_modules names too; LoRA on the "
                          "attention adapts it already")
            continue
        if isinstance(module, LORA_LAYERS):
            layer = module
        else:
            layer = lone_out_proj(module, name) if owner is not None else wrap(module, name)
        match_fan_in_fan_out(name, layer.base_layer, config)
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        layer.add_adapter(adapter_name, config, r, alpha, autocast_adapter_dtype)
        warn_if_unmergeable(name, layer, config)
        if layer is not module:
            set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def regex_hint(model: nn.Module, targets) -> str:
    """A string target is a full-match regex (HF PEFT), so "q_proj" matches no "model.layers.0.self_attn.q_proj"
    while the candidates show q_proj: say so, and what was likely meant (a list matches name endings)."""
    if not isinstance(targets, str):
        return ""
    names = [name for name, m in walk_unwrapped(model) if name and is_adaptable(m)]
    parts = targets.split("|")
    meant = [n for n in names if matches(n, parts)]  # what the list form of these names would adapt
    hint = f". A string is a regex that must match a whole module name, e.g. {(meant or names or [''])[0]!r}"
    if not meant or not all(re.fullmatch(r"[\w.]+", part) for part in parts):
        return hint + "; a list of names matches module names by their endings"
    regex = f".*{targets}" if len(parts) == 1 else f".*({targets})"
    listed = ", ".join(f'"{part}"' for part in parts)
    return f"{hint}; for every module named {' or '.join(parts)}: target_modules = [{listed}] or the regex {regex!r}"


def warn_if_unmergeable(name: str, layer: nn.Module, config: LoraConfig) -> None:
    """PEFT's update_layer warning: lora_B's bias runs in the forward, but merging needs a base bias to add it to."""
    if config.lora_bias and layer.base_layer.bias is None:
        warnings.warn(f"lora_bias=True but {name} ({type(layer.base_layer).__name__}) has no bias: the adapter works, "
                      "but it cannot be merged into this layer")


def match_fan_in_fan_out(name: str, base: nn.Module, config: LoraConfig) -> None:
    """PEFT's dispatch_default: the flag follows the layer (the weight's layout decides here either way), and
    PEFT saves what it set, so a saved config reads the same from both libraries."""
    if is_conv1d(base) and not config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out is False but {name} is a Conv1D (weight stored (in, out)): setting it to True")
        config.fan_in_fan_out = True
    elif isinstance(base, (nn.Linear, nn.MultiheadAttention)) and config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out is True but {name} is an {type(base).__name__}: setting it to False")
        config.fan_in_fan_out = False


def wrap(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, CONV_TYPES):
        return LoraConv(module)
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention(module)
    if is_linear(module):
        return LoraLinear(module)
    kind = type(module).__name__
    if kind == "Conv1D":  # named like GPT-2's, but not its contract: say which part is missing
        weight = getattr(module, "weight", None)
        raise TypeError(f"target {name!r} is a Conv1D but not GPT-2's: LoRA takes a Conv1D with an int `nf` and a "
                        f"2-D weight stored (in_features, nf); this one has nf={getattr(module, 'nf', None)!r} and "
                        f"weight shape {None if weight is None else tuple(weight.shape)}")
    raise TypeError(f"target {name!r} is a {kind}; LoRA adapts nn.Linear, GPT-2's Conv1D (peftcore's or "
                    "transformers'), nn.Conv1d / Conv2d / Conv3d, nn.Embedding, nn.MultiheadAttention and quantized "
                    "linears; a module's bare nn.Parameters (MoE expert stacks) take target_parameters, e.g. "
                    "['experts.gate_up_proj']")


# -- target_parameters ------------------------------------------------------------------------------
def unwrapped_name(name: str) -> str:
    """A module's name without the `base_layer` steps adapter wrappers put in ("experts.base_layer" -> "experts")."""
    parts = name.split(".")
    return ".".join(parts[:1] + [p for p in parts[1:] if p != "base_layer"])


def inside_adapter(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether module `name` is an adapter's own part (lora_A, a modules_to_save copy), not under a base_layer."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(modules.get(".".join(parts[:i])), (*LORA_LAYERS, ModulesToSave)) and parts[i] != "base_layer":
            return True
    return False


def parameter_keys(model: nn.Module):
    """(module name, "<module>.<param>" key, param name) for every parameter registered directly on a module
    (recurse=False), keys without base_layer steps: what a target_parameters entry is matched against."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if inside_adapter(modules, name) or isinstance(module, parametrize.ParametrizationList):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            yield unwrapped_name(name), f"{unwrapped_name(name)}.{param_name}".lstrip("."), param_name
        for param_name in getattr(module, "parametrizations", {}):  # torch.nn.utils.parametrize
            yield unwrapped_name(name), f"{unwrapped_name(name)}.{param_name}".lstrip("."), param_name


def located(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the module at `name` (a name without base_layer steps), looking through
    the ParamWrappers of its ancestors' parameters."""
    parent, module = None, model
    for part in name.split("."):
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        parent, module = module, getattr(module, part)
    return parent, part, module


def param_wrapper_for(module: nn.Module, param_name: str) -> ParamWrapper | None:
    """The ParamWrapper of `param_name` in the chain of wrappers `module` heads, if there is one."""
    while isinstance(module, ParamWrapper):
        if module.parameter_name == param_name:
            return module
        module = module.base_layer
    return None


def wrapped_parameter_keys(model: nn.Module) -> set[str]:
    """Keys of the parameters other adapters adapt already (their ParamWrappers hold an adapter)."""
    return {f"{unwrapped_name(n)}.{m.parameter_name}" for n, m in model.named_modules()
            if isinstance(m, ParamWrapper) and m.r}


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str,
                      autocast_adapter_dtype: bool) -> dict[str, ParamWrapper]:
    """The target_parameters part of inject_lora: a ParamWrapper per matched parameter (or the adapter added to the
    one an earlier adapter made). PEFT's rules: entries sorted; modules in named_modules order, each one's own
    parameters in their order; no parameter of the top-level module; none of a layer target_modules adapts.
    Everything is checked before the first wrapper goes in. -> {key: wrapper}."""
    found = matched_parameters(model, config)
    for module_name, key, _ in found:
        holder = located(model, module_name)[2] if module_name else model
        check_parameter(holder, module_name, key, config, pattern_value(key, config.rank_pattern, config.r))
    wrappers = {}
    for module_name, key, param_name in found:
        parent, attribute, holder = located(model, module_name)
        layer = param_wrapper_for(holder, param_name)
        if layer is None:
            layer = ParamWrapper(holder, param_name)
            setattr(parent, attribute, layer)
        r = pattern_value(key, config.rank_pattern, config.r)
        layer.add_adapter(adapter_name, config, r, pattern_value(key, config.alpha_pattern, config.lora_alpha),
                          autocast_adapter_dtype)
        wrappers[key] = layer
    return wrappers


def matched_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str, str]]:
    """(module name, key, param name) of the parameters config.target_parameters names; the same set as the other
    adapters' (HF PEFT's rule: the wrappers' nesting names their keys, so it must not differ between adapters)."""
    if isinstance(config.target_parameters, str):
        raise TypeError("target_parameters must be a list of parameter names, e.g. ['experts.gate_up_proj'], not a str")
    targets = sorted(set(config.target_parameters))
    found = [(module, key, param) for module, key, param in parameter_keys(model)
             if key in targets or any(key.endswith(f".{t}") for t in targets)]
    before = wrapped_parameter_keys(model)
    if before and found and {key for _, key, _ in found} != before:
        raise ValueError(f"target_parameters={config.target_parameters!r} adapts {sorted(k for _, k, _ in found)} but "
                         f"the model's other adapters adapt {sorted(before)}: all adapters with target_parameters "
                         "must adapt the same parameters (as in HF PEFT), since the wrappers' nesting names their keys")
    return found


def check_parameter(holder: nn.Module, module_name: str, key: str, config: LoraConfig, r: int) -> None:
    """Raise if the parameter `key` of module `module_name` cannot take this adapter (checked for all first)."""
    param_name = key.rpartition(".")[2]
    if not module_name:
        raise ValueError(f"target_parameters: {param_name!r} is a parameter of the top-level module, which cannot "
                         "be wrapped (as in HF PEFT); move it into a submodule")
    module = holder
    while isinstance(module, ParamWrapper):
        module = module.base_layer
    if param_name in getattr(module, "parametrizations", {}):
        raise ValueError(f"target_parameters: {key!r} is parametrized (torch.nn.utils.parametrize), which peftcore's "
                         "ParamWrapper does not adapt (HF PEFT stacks its update on the parametrization); remove "
                         "the parametrization first, or leave the parameter out")
    if isinstance(holder, LORA_LAYERS) and not isinstance(holder, ParamWrapper):
        raise ValueError(f"target_parameters: {key!r} belongs to a layer target_modules adapts already "
                         f"({type(holder).__name__}); leave it out of one of the two (as in HF PEFT)")
    why = refusal(config, r)
    if why:
        raise ValueError(f"LoRA on the parameter {key!r} (target_parameters) does not work with {why}, as in HF PEFT")
    check_shape(module, param_name, key)


def no_parameter_matched(model: nn.Module, config: LoraConfig) -> str:
    """The error (or warning) for target_parameters that match nothing, with what they could name."""
    keys = sorted({".".join(key.split(".")[-2:]) for name, key, _ in parameter_keys(model) if name})
    shown = ", ".join(keys[:16]) + (f", ... ({len(keys)} in all)" if len(keys) > 16 else "")
    return (f"target_parameters={config.target_parameters!r} matched no parameter of {type(model).__name__}; an entry "
            f"names '<module>.<parameter>' (the key's ending). Candidates: {shown or 'none'}")
