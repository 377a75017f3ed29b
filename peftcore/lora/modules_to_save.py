"""`modules_to_save`: fully trained copies of whole modules (a classification head, say).

Mirrors HF PEFT's wrapper so state-dict keys match: `<name>.original_module.*` holds the frozen
original and `<name>.modules_to_save.<adapter>.*` one trainable copy per adapter. A module is
wrapped when its full name ends with one of the configured names (PEFT's `str.endswith` rule).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from peftcore.lora.registry import LORA_LAYERS


class ModulesToSave(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_params(self, name: str):
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def module_for(self, name: str | None) -> nn.Module:
        """The copy of adapter `name`; the original when adapters are off or `name` has no copy here."""
        if self.disable_adapters or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def active_module(self) -> nn.Module:
        return self.module_for(self.active_adapters[0] if self.active_adapters else None)

    def forward(self, x, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        return self.mixed_batch_forward(x, adapter_names, *args, **kwargs)

    def mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        """Row b runs through the copy of adapter_names[b] ("__base__": the original)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]}")
        outputs, order = [], []
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            outputs.append(self.module_for(name)(x[rows], *args, **kwargs))
            order += rows
        return torch.cat(outputs)[torch.tensor(order).argsort()]


def walk_unwrapped(model: nn.Module):
    """named_modules(), but not the insides of adapter wrappers (a LoRA layer's base_layer, lora_A, ...;
    a ModulesToSave's copies; a wrapper class that says `is_adapter_wrapper = True`, as trainable_tokens' does,
    which imports this module): they are no targets of their own. Here, not in inject, because it must know
    ModulesToSave and inject imports this module."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (*LORA_LAYERS, ModulesToSave)) or getattr(module, "is_adapter_wrapper", False):
            inside.append(name)
        yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def wrap_modules_to_save(model: nn.Module, patterns: list[str], adapter_name: str) -> list[str]:
    """Wrap (or extend) every module whose full name ends with one of `patterns`. -> wrapped names."""
    names = []
    for name, module in list(walk_unwrapped(model)):
        if not name or not any(name.endswith(p) for p in patterns):
            continue
        if isinstance(module, LORA_LAYERS):
            raise TypeError(f"modules_to_save={patterns!r} names {name!r}, which LoRA adapts already; "
                            "pick one of the two")
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            set_submodule(model, name, wrapper)
        names.append(name)
    if not names:
        raise ValueError(f"modules_to_save={patterns!r} matched no module of {type(model).__name__}")
    return names
