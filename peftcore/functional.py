"""HF PEFT's module-level functions (exported at peft's top level and in peft.functional), with its names,
arguments and keys: on a PeftModel, or on any nn.Module that LoRA layers were injected into directly.

    model = inject_adapter_in_model(LoraConfig(...), model)     # LoRA layers, no PeftModel: keys `...lora_A.default...`
    state = get_peft_model_state_dict(model)                     # the adapter, adapter name stripped (file keys)
    result = set_peft_model_state_dict(model, state)             # -> (missing_keys, unexpected_keys), as torch's
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from peftcore import adapter_io, adapter_keys
from peftcore.config import LoraConfig
from peftcore.lora_backend import activate, add_lora
from peftcore.methods import fit_layers_to_file, method_of
from peftcore.prompt.configs import PromptLearningConfig
from peftcore.prompt.encoders import load_prompt_embeddings, saved_prompt_tensors

PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the user's model; an injected model has no prefix


class LoadResult(NamedTuple):
    """What torch's load_state_dict(strict=False) returns, and so PEFT's set_peft_model_state_dict."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False) -> nn.Module:
    """LoRA layers (and modules_to_save copies) swapped into `model` in place, without a PeftModel. -> `model`.

    As PEFT's: the model's own weights are frozen, the new adapter trains (unless inference_mode) and is the
    active one; `model.peft_config` ({name: config}) records the adapters, for the state-dict functions.
    low_cpu_mem_usage: the adapter's tensors are made on the meta device, for set_peft_model_state_dict to fill."""
    if not isinstance(peft_config, LoraConfig) or method_of(peft_config).inject is not None:
        raise ValueError(f"inject_adapter_in_model adds LoRA adapters, not a {type(peft_config).__name__} (PEFT's "
                         "supports no prompt learning either): use get_peft_model")
    configs = getattr(model, "peft_config", None)
    if configs is None:
        configs = model.peft_config = {}
    if adapter_name in configs:
        raise ValueError(f"the model has an adapter named {adapter_name!r} already; pick another adapter_name")
    config = copy.deepcopy(peft_config)  # injection fills it in (all-linear, a SEQ_CLS head): not the caller's
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, configs, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
    configs[adapter_name] = config
    activate(model, [adapter_name], configs)
    return model


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under PEFT's file keys (`base_model.model....lora_A.weight` in a
    PeftModel, `....lora_A.weight` in an injected model): what save_pretrained writes. `state_dict`: the values
    to take (e.g. gathered from a sharded model); which keys belong is read off `model`. As PEFT's:
    unwrap_compiled takes the model out of torch.compile's wrapper; save_embedding_layers (True / False / "auto")
    says whether the token embedding and output head go in too (adapter_keys.embedding_keys)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = model.peft_config[adapter_name]
    adapter_keys.check_save_embedding_layers(save_embedding_layers, isinstance(config, PromptLearningConfig))
    if isinstance(config, PromptLearningConfig):
        return saved_prompt_tensors(model.prompt_encoder[adapter_name], config)
    return adapter_keys.adapter_state_dict(model, adapter_name, config, state_dict, save_embedding_layers)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Load a get_peft_model_state_dict (ours or PEFT's) into adapter `adapter_name`, which the model must have.

    As PEFT's (and in its argument order): the adapter name goes back into the keys, a PeftModel's
    `base_model.model.` prefix is dropped for an injected model, and the result lists the model's keys the dict
    lacks (its base weights among them) and the dict's keys the model lacks. A shape mismatch is an error naming
    the key; with ignore_mismatched_sizes the tensor is skipped (so listed as missing) with PEFT's warning. Meta
    tensors (adapters made with low_cpu_mem_usage) are replaced by the given ones whatever `low_cpu_mem_usage`
    says: PEFT needs the flag, we see the meta device."""
    config = model.peft_config[adapter_name]
    given = dict(peft_model_state_dict)
    if isinstance(config, PromptLearningConfig):
        load_prompt_embeddings(model.prompt_encoder[adapter_name], given.pop("prompt_embeddings"), "state dict")
        return LoadResult([], list(given))
    fit_layers_to_file(adapter_keys.user_model(model), config, adapter_name)
    state = model.state_dict(keep_vars=True)
    if not any(k.startswith(PEFT_PREFIX) for k in state):
        given = {k.removeprefix(PEFT_PREFIX): v for k, v in given.items()}
    to_memory, _ = adapter_keys.load_map(model, adapter_name, state)
    mapped = {to_memory.get(k, k): v for k, v in given.items()}
    loadable = {k: v for k, v in mapped.items() if k in state}
    mismatched = [(k, tuple(v.shape), tuple(state[k].shape)) for k, v in loadable.items()
                  if tuple(v.shape) != tuple(state[k].shape)]
    if mismatched and not ignore_mismatched_sizes:
        key, given, expected = mismatched[0]
        raise adapter_io.AdapterLoadError(f"state dict: {key} has shape {given} but the model expects {expected} "
                                          "(ignore_mismatched_sizes=True skips such tensors)")
    for key in adapter_io.skip_mismatched(model, state, mismatched):
        del loadable[key], mapped[key]
    adapter_io.load_tensors(model, state, loadable.items())
    return LoadResult([k for k in state if k not in mapped], [k for k in mapped if k not in state])
