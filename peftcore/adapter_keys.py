"""Which tensors make up one adapter, and under which keys: the on-disk key of each in-memory tensor.

In memory a key carries the adapter name: `...q_proj.lora_A.default.weight`; on disk it does not:
`...q_proj.lora_A.weight` (DoRA's `...lora_magnitude_vector.default.weight` becomes `...lora_magnitude_vector`,
a `modules_to_save` copy `...score.modules_to_save.default.weight` becomes `...score.weight`, trained token rows
`...token_adapter.trainable_tokens_delta.default` `...token_adapter.trainable_tokens_delta`). Besides the adapter's
own tensors PEFT saves the biases bias="all" / "lora_only" trains and, per save_embedding_layers, the token
embedding and output head. adapter_io writes and reads the files; get_peft_model_state_dict uses this directly.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from peftcore._json import read_json_object
from peftcore.config import LoraConfig
from peftcore.lora.modules_to_save import ModulesToSave
from peftcore.lora.trainable_tokens import token_row_keys
from peftcore.methods import ADAPTER_LAYERS, method_of, trains_adapted_biases

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names that make it save the embedding tables
TOKEN_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings")  # our models' input embeddings


def strip_adapter_name(key: str, adapter_name: str) -> str:
    """In-memory key -> on-disk key (PEFT's rule): drop the adapter name where it ends the module path.

    `...lora_A.default.weight` -> `...lora_A.weight`; `...lora_embedding_A.default` -> `...lora_embedding_A`;
    DoRA's `...lora_magnitude_vector.default.weight` -> `...lora_magnitude_vector`. Other keys pass unchanged.
    """
    if key.endswith(f".lora_magnitude_vector.{adapter_name}.weight"):
        key = key.removesuffix(".weight")
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{adapter_name}') + '$', '', head)}.{suffix}" if head else key


def other_adapters_removed(state: dict, peft_model: nn.Module, adapter_name: str) -> dict:
    others = [n for n in getattr(peft_model, "peft_config", {}) if n != adapter_name]
    return {k: v for k, v in state.items() if not any(f".{o}." in k or k.endswith(f".{o}") for o in others)}


def adapter_layer_names(peft_model: nn.Module) -> list[str]:
    """The adapter layers of every method (LoRA's, OFT's, ...)."""
    return [name for name, m in peft_model.named_modules() if isinstance(m, ADAPTER_LAYERS)]


def adapter_keys(state: dict, peft_model: nn.Module) -> list[str]:
    """Keys that live on an adapter layer but not in the base layer it wraps (lora_A, lora_B, magnitudes, oft_R),
    nor in the model-wide tensors it refers to (a layer's `shared_state`: VeRA's projections, see shared_keys),
    nor in what PEFT leaves out of files (a layer's `unsaved_state`: AdaLoRA's ranknum)."""
    def not_own(name: str, m: nn.Module) -> tuple[str, ...]:  # a nested layer under base_layer. has its own entry
        parts = (*getattr(m, "shared_state", ()), *getattr(m, "unsaved_state", ()))
        return (f"{name}.base_layer.", *(f"{name}.{part}." for part in parts))

    layers = [(f"{name}.", not_own(name, m)) for name, m in peft_model.named_modules() if isinstance(m, ADAPTER_LAYERS)]
    return [k for k in state if any(k.startswith(p) and not k.startswith(skip) for p, skip in layers)]


def shared_keys(state: dict, peft_model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> in-memory key of the model-wide tensors of `adapter_name` (PEFT's VeRA: `base_model.vera_A`
    on disk, `base_model.vera_A.<adapter>` in memory, kept outside every layer; absent with save_projection=False,
    where they are drawn again from projection_prng_key)."""
    names = {part for m in peft_model.modules() for part in getattr(m, "shared_state", ())}
    inside = tuple(f"{n}." for n in adapter_layer_names(peft_model))
    wanted = {f"{part}.{adapter_name}" for part in names}
    return {k.removesuffix(f".{adapter_name}"): k for k in state
            if not k.startswith(inside) and any(k == w or k.endswith(f".{w}") for w in wanted)}


def bias_keys(state: dict, peft_model: nn.Module, bias: str) -> list[str]:
    """The base biases PEFT saves beside the adapter: every `.bias` for "all", the adapted layers' for "lora_only"
    (OFT's "oft_only", ...)."""
    if bias == "all":
        return [k for k in state if k.endswith(".bias")]
    if trains_adapted_biases(bias):
        return [f"{name}.base_layer.bias" for name in adapter_layer_names(peft_model)
                if f"{name}.base_layer.bias" in state]
    return []


def embedding_is_targeted(config: LoraConfig, model: nn.Module) -> bool:
    """PEFT saves the token embedding / output head when target_modules names `embed_tokens` or `lm_head`:
    for a regex, when it matches such a module's name in `model`, the user's model (PEFT 0.21.2's
    get_peft_model_state_dict matches names of `get_base_model()`, without `base_model.model.`, so an
    anchored `^embed_tokens` counts)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return any(
            re.fullmatch(targets, name) for name, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def user_model(peft_model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel; a model LoRA was injected into directly is its own (PEFT's rule)."""
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def check_save_embedding_layers(value, is_prompt_learning: bool) -> None:
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"save_embedding_layers is True, False or 'auto' (PEFT's values), not {value!r}")
    if value is True and is_prompt_learning:
        raise ValueError("save_embedding_layers=True saves the base model's embedding tables beside a LoRA adapter; "
                         "a prompt-learning adapter holds its prompts only: leave save_embedding_layers at 'auto'")


def embedding_keys(state: dict, peft_model: nn.Module, config: LoraConfig, save_embedding_layers="auto") -> list[str]:
    """PEFT's save_embedding_layers: True saves the token embedding and output head (when LoRA targets them, the
    base table it wraps; else the whole module); "auto" does when `embedding_is_targeted` (and no trainable
    token rows are used), or when the vocabulary was resized (`vocab_was_resized`); False never does."""
    targeted = embedding_is_targeted(config, user_model(peft_model))
    if save_embedding_layers == "auto":
        trainable_tokens = getattr(config, "trainable_token_indices", None) is not None
        save_embedding_layers = (targeted and not trainable_tokens) or vocab_was_resized(peft_model, config)
    if not save_embedding_layers:
        return []
    layers = embedding_modules(peft_model)
    if not layers:
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
    prefixes = tuple(f"{name}.base_layer." if targeted else f"{name}." for name, layer in layers.items()
                     if not targeted or isinstance(getattr(layer, "base_layer", None), (nn.Linear, nn.Embedding)))
    return [k for k in state if k.startswith(prefixes)]


def embedding_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module, for the token embedding and the output head: transformers' get_input_embeddings /
    get_output_embeddings where the model has them, else by name (peftcore's models use transformers' names)."""
    model = user_model(peft_model)
    if hasattr(model, "get_input_embeddings"):  # a transformers model wrapped directly
        wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        return {name: m for name, m in peft_model.named_modules() if any(m is w for w in wanted)}
    return {name: m for name, m in peft_model.named_modules()
            if name.rsplit(".", 1)[-1] in TOKEN_EMBEDDING_NAMES + ("lm_head",)}


def vocab_was_resized(peft_model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's "auto" check: the model's vocab_size is not that of the config.json at base_model_name_or_path (a
    local folder only: peftcore looks nothing up on the Hub), with PEFT's warning when it is not."""
    vocab = getattr(getattr(user_model(peft_model), "config", None), "vocab_size", None)
    base = Path(config.base_model_name_or_path or "") / "config.json"
    if not vocab or not config.base_model_name_or_path or not base.is_file():
        return False
    saved = read_json_object(base).get("vocab_size")
    if saved is None or saved == vocab:
        return False
    warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                  "finetuning.")
    return True


def modules_to_save_keys(peft_model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> in-memory key for the adapter's modules_to_save copies (saved under the plain path)."""
    keys = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for k in module.modules_to_save[adapter_name].state_dict():
                keys[f"{name}.{k}"] = f"{name}.modules_to_save.{adapter_name}.{k}"
    return keys


def adapter_state_dict(peft_model: nn.Module, adapter_name: str, config: LoraConfig,
                       state: dict[str, torch.Tensor] | None = None,
                       save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The tensors that make up one adapter, under their on-disk keys (the same set HF PEFT saves). `state`:
    the values to take (default: the model's state_dict()); which keys belong is read off the model."""
    state = other_adapters_removed(peft_model.state_dict() if state is None else state, peft_model, adapter_name)
    selected = adapter_keys(state, peft_model) + bias_keys(state, peft_model, getattr(config, "bias", "none"))
    selected += embedding_keys(state, peft_model, config, save_embedding_layers)
    out = {strip_adapter_name(k, adapter_name): state[k] for k in selected}
    saved_copies = modules_to_save_keys(peft_model, adapter_name) | token_row_keys(peft_model, adapter_name)
    saved_copies |= shared_keys(state, peft_model, adapter_name)
    out.update({disk: state[memory] for disk, memory in saved_copies.items() if memory in state})
    to_file = method_of(config).to_file  # AdaLoRA: only the triplets its schedule kept
    return out if to_file is None else to_file(out, config)


def load_map(peft_model: nn.Module, adapter_name: str, state: dict) -> tuple[dict[str, str], set[str]]:
    """-> (on-disk key -> in-memory key for everything a file may hold, the in-memory keys it must hold)."""
    state = other_adapters_removed(state, peft_model, adapter_name)
    to_memory = {strip_adapter_name(k, adapter_name): k for k in state}
    saved_copies = modules_to_save_keys(peft_model, adapter_name) | token_row_keys(peft_model, adapter_name)
    to_memory.update(saved_copies)
    required = {k for k in adapter_keys(state, peft_model) if k != strip_adapter_name(k, adapter_name)}
    return to_memory, required | set(saved_copies.values())
