"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

On disk a key carries no adapter name: in memory `...q_proj.lora_A.default.weight`, on disk
`...q_proj.lora_A.weight`; DoRA's `...lora_magnitude_vector.default.weight` becomes
`...lora_magnitude_vector`; a `modules_to_save` copy `...score.modules_to_save.default.weight`
becomes `...score.weight`. The adapter named "default" lives in the folder, any other in
`<folder>/<name>/`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from peftcore.models import safetensors_io

from .config import CONFIG_CLASSES, CONFIG_NAME, LoraConfig
from .lora import LORA_LAYERS, LoraEmbedding

WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterLoadError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def adapter_folder(folder: str | Path, adapter_name: str) -> Path:
    return Path(folder) if adapter_name == "default" else Path(folder) / adapter_name


def saved_key(key: str, adapter_name: str) -> str | None:
    """In-memory state-dict key -> key on disk, or None if the key is not part of this adapter."""
    n = re.escape(adapter_name)
    for pattern, repl in (
        (rf"\.(lora_A|lora_B)\.{n}\.", r".\1."),
        (rf"\.(lora_embedding_A|lora_embedding_B)\.{n}$", r".\1"),
        (rf"\.lora_magnitude_vector\.{n}\.weight$", ".lora_magnitude_vector"),
        (rf"\.modules_to_save\.{n}\.", "."),
    ):
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return None


def extra_saved_keys(peft_model: nn.Module, config: LoraConfig) -> list[str]:
    """Base tensors PEFT saves beside the adapter: trained biases, and targeted embedding tables."""
    state = peft_model.state_dict()
    lora_layers = [name for name, m in peft_model.named_modules() if isinstance(m, LORA_LAYERS)]
    keys = []
    if config.bias == "all":
        keys = [k for k in state if k.endswith(".bias") and not re.search(r"\.(lora_|modules_to_save\.|original_module\.)", k)]
    elif config.bias == "lora_only":
        keys = [f"{name}.base_layer.bias" for name in lora_layers if f"{name}.base_layer.bias" in state]
    embeddings = [n for n, m in peft_model.named_modules() if isinstance(m, LoraEmbedding)]
    return keys + [f"{n}.base_layer.weight" for n in embeddings]


def adapter_state_dict(peft_model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors that make up one adapter, under their on-disk keys."""
    state = peft_model.state_dict()
    out = {saved_key(k, adapter_name): v for k, v in state.items() if saved_key(k, adapter_name)}
    out.update({k: state[k] for k in extra_saved_keys(peft_model, config)})
    return out


def save_adapter(peft_model: nn.Module, folder: str | Path, adapter_name: str, config) -> Path:
    target = adapter_folder(folder, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    config.save(target)
    safetensors_io.write(adapter_state_dict(peft_model, adapter_name, config), target / WEIGHTS_NAME)
    return target


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: expected an adapter saved by peftcore or HF PEFT")
    return json.loads(path.read_text())


def config_from_dict(d: dict):
    """Dispatch on peft_type; a method peftcore does not know is a clear error."""
    peft_type = d.get("peft_type")
    if peft_type not in CONFIG_CLASSES:
        known = ", ".join(CONFIG_CLASSES)
        raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; peftcore supports {known}")
    return CONFIG_CLASSES[peft_type].from_dict(d)


def load_adapter_weights(peft_model: nn.Module, folder: str | Path, adapter_name: str, config) -> None:
    """Copy the file's tensors into the adapter's parameters; every key must fit by name and shape."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder} (peftcore reads safetensors adapters only)")
    state = peft_model.state_dict(keep_vars=True)
    memory_key = {saved_key(k, adapter_name): k for k in state if saved_key(k, adapter_name)}
    memory_key.update({k: k for k in extra_saved_keys(peft_model, config)})
    found = set()
    for key, tensor in safetensors_io.iter_tensors(path):
        if key not in memory_key:
            raise AdapterLoadError(f"{path.name}: key {key} fits no parameter of the model (another base model?)")
        target = state[memory_key[key]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"{path.name}: {key} has shape {tuple(tensor.shape)} but the model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        found.add(key)
    missing = sorted(k for k in memory_key if k not in found and saved_key(memory_key[k], adapter_name))
    if missing:
        raise AdapterLoadError(f"{path.name} lacks {len(missing)} adapter tensor(s), e.g. {', '.join(missing[:4])}")

