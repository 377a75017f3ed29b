"""The weight-adapting methods in one table: what the layer backend, the adapter files and the merges look up
by a config's type. LoRA (with DoRA) lives in lora/; each further method in a subpackage of its own (adalora/,
ia3/, lycoris/, oft/, vera/) with a config, layers that wrap a base layer behind the Adapter Protocol, and one
inject function; a method that needs more (AdaLoRA: a check on new adapters, files that keep only the triplets
its schedule kept, a step hook for the training loop) names the functions here.

A method's layers keep HF PEFT's attribute names, so its state-dict keys are PEFT's, and on disk the adapter
name drops out by the one rule of adapter_keys.strip_adapter_name (`...oft_R.default.weight` ->
`...oft_R.weight`): the backend needs no per-method code beyond this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from peftcore.adalora import (
    ADALORA_LAYERS,
    AdaLoraConfig,
    RankAllocator,
    check_one_trainable,
    inject_adalora,
    resize_for_load,
    resized_for_file,
)
from peftcore.config import LoraConfig, PeftConfig
from peftcore.ia3 import IA3_LAYERS, IA3Config, inject_ia3
from peftcore.lora.registry import LORA_LAYERS
from peftcore.lycoris import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer, inject_loha, inject_lokr
from peftcore.oft import OFT_LAYERS, OFTConfig, inject_oft
from peftcore.vera import VeraConfig, VeraLinear, inject_vera


@dataclass(frozen=True)
class Method:
    name: str
    config: type[PeftConfig]
    layers: tuple[type, ...]
    inject: Callable | None  # (model, config, adapter_name, autocast_adapter_dtype) -> {name: layer}; LoRA: None
    shares_state: bool = False  # inject takes `holder`, the module keeping model-wide tensors (VeRA's projections)
    check_new: Callable | None = None  # (configs, name, config): raise before a new adapter changes the model
    to_file: Callable | None = None  # (on-disk tensors, config) -> what the file holds
    before_load: Callable | None = None  # (model, config, name): fit the layers to a file's shapes
    step_hook: Callable | None = None  # (model, config, name) -> the training loop's hook (training.hooks.StepHook)


METHODS = (  # AdaLoRA before LoRA: its config is a LoraConfig (as in PEFT), so the first match must be its own
    Method("AdaLoRA", AdaLoraConfig, ADALORA_LAYERS, inject_adalora, check_new=check_one_trainable,
           to_file=resized_for_file, before_load=resize_for_load, step_hook=RankAllocator),
    Method("LoRA", LoraConfig, LORA_LAYERS, None),  # lora_backend.add_lora: DoRA, token rows, parameters
    Method("IA3", IA3Config, IA3_LAYERS, inject_ia3),
    Method("LoHa", LoHaConfig, (LoHaLayer,), inject_loha),
    Method("LoKr", LoKrConfig, (LoKrLayer,), inject_lokr),
    Method("OFT", OFTConfig, OFT_LAYERS, inject_oft),
    Method("VeRA", VeraConfig, (VeraLinear,), inject_vera, shares_state=True),
)
LAYER_METHOD_CONFIGS = tuple(m.config for m in METHODS)
ADAPTER_LAYERS = tuple(layer for m in METHODS for layer in m.layers)  # every adapter layer class


def method_of(config: PeftConfig) -> Method:
    for method in METHODS:
        if isinstance(config, method.config):
            return method
    raise TypeError(f"{type(config).__name__} adapts no weights; layer methods: "
                    f"{', '.join(m.config.__name__ for m in METHODS)}")


def fit_layers_to_file(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Before a file (or state dict) of adapter `adapter_name` loads: the method's before_load, if it has one
    (AdaLoRA: shrink the layers to the ranks a pruned file holds)."""
    before_load = method_of(config).before_load
    if before_load is not None:
        before_load(model, config, adapter_name)


def trains_adapted_biases(bias: str) -> bool:
    """PEFT's per-method `bias` value for "the adapted layers' own biases train": "lora_only", "oft_only", ..."""
    return bias.endswith("_only")
