"""`modules_to_save`: fully trained copies of whole modules (a classification head, say).

Mirrors HF PEFT's wrapper so state-dict keys match: `<name>.original_module.*` holds the frozen
original and `<name>.modules_to_save.<adapter>.*` one trainable copy per adapter.
"""
from __future__ import annotations

import copy
import re

from torch import nn


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
        self.modules_to_save.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_params(self, name: str):
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def active_module(self) -> nn.Module:
        active = [a for a in self.active_adapters if a in self.modules_to_save]
        return self.original_module if self.disable_adapters or not active else self.modules_to_save[active[0]]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)


def wrap_modules_to_save(model: nn.Module, patterns: list[str], adapter_name: str) -> list[str]:
    """Wrap (or extend) every module whose name is, or ends with, one of `patterns`. -> wrapped names."""
    names = []
    for name, module in list(model.named_modules()):
        if not name or ".modules_to_save." in name or ".original_module" in name:
            continue
        if not any(re.fullmatch(rf"(.*\.)?{re.escape(p)}", name) for p in patterns):
            continue
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper)
        names.append(name)
    if not names:
        raise ValueError(f"modules_to_save={patterns!r} matched no module of {type(model).__name__}")
    return names
