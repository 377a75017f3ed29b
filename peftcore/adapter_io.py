"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

On disk a key carries no adapter name: in memory `...q_proj.lora_A.default.weight`, on disk
`...q_proj.lora_A.weight`; DoRA's `...lora_magnitude_vector.default.weight` becomes
`...lora_magnitude_vector`; a `modules_to_save` copy `...score.modules_to_save.default.weight`
becomes `...score.weight`. The adapter named "default" lives in the folder, any other in
`<folder>/<name>/`. The file holds the same keys PEFT writes: besides the adapter, the biases
bias="all" / "lora_only" trains, and the base table of a targeted `embed_tokens` / `lm_head`.
Older PEFT saves hold `adapter_model.bin` (a pickle) instead: read (`adapter_weights`), never written.
Beside the adapters, a README.md model card, as PEFT writes one.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from peftcore._json import read_json_object
from peftcore._version import __version__
from peftcore.config import CONFIG_NAME, PEFT_FORMAT_VERSION, LoraConfig, PeftConfig
from peftcore.lora.modules_to_save import ModulesToSave
from peftcore.lora.registry import LORA_LAYERS
from peftcore.models import safetensors_io
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.prompt.encoders import load_prompt_embeddings, saved_prompt_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # HF PEFT's save_pretrained(..., safe_serialization=False)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names that make it save the embedding tables
TOKEN_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings")  # our models' input embeddings


# The one registry of methods a saved adapter_config.json may name: peft_type -> its config class. Written out
# here, not filled in as a side effect of importing a module, so every supported method is in one table.
CONFIG_CLASSES: dict[str, type[PeftConfig]] = {
    config.peft_type.value: config
    for config in (LoraConfig, PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig)
}


class AdapterLoadError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def adapter_folder(folder: str | Path, adapter_name: str) -> Path:
    return Path(folder) if adapter_name == "default" else Path(folder) / adapter_name


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


def lora_layer_names(peft_model: nn.Module) -> list[str]:
    return [name for name, m in peft_model.named_modules() if isinstance(m, LORA_LAYERS)]


def adapter_keys(state: dict, peft_model: nn.Module) -> list[str]:
    """Keys that live on a LoRA layer but not in the base layer it wraps (lora_A, lora_B, magnitudes, ...)."""
    prefixes = [f"{name}." for name in lora_layer_names(peft_model)]
    return [k for k in state if any(k.startswith(p) and not k.startswith(p + "base_layer.") for p in prefixes)]


def bias_keys(state: dict, peft_model: nn.Module, bias: str) -> list[str]:
    """The base biases PEFT saves beside the adapter: every `.bias` for "all", the adapted layers' for "lora_only"."""
    if bias == "all":
        return [k for k in state if k.endswith(".bias")]
    if bias == "lora_only":
        return [f"{name}.base_layer.bias" for name in lora_layer_names(peft_model)
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


def embedding_keys(state: dict, peft_model: nn.Module, config: LoraConfig) -> list[str]:
    """Base weights of an adapted token embedding or output head, saved when `embedding_is_targeted`."""
    if not embedding_is_targeted(config, user_model(peft_model)):
        return []
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, LORA_LAYERS)}
    wanted = [
        name for name, layer in layers.items()
        if is_token_embedding_or_head(peft_model, name, layer)
        and isinstance(layer.base_layer, (nn.Linear, nn.Embedding))
    ]
    return [k for k in state if any(k.startswith(f"{name}.base_layer.") for name in wanted)]


def is_token_embedding_or_head(peft_model: nn.Module, name: str, layer: nn.Module) -> bool:
    model = user_model(peft_model)
    if hasattr(model, "get_input_embeddings"):  # a transformers model wrapped directly
        return layer is model.get_input_embeddings() or layer is model.get_output_embeddings()
    return name.rsplit(".", 1)[-1] in TOKEN_EMBEDDING_NAMES + ("lm_head",)


def modules_to_save_keys(peft_model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> in-memory key for the adapter's modules_to_save copies (saved under the plain path)."""
    keys = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for k in module.modules_to_save[adapter_name].state_dict():
                keys[f"{name}.{k}"] = f"{name}.modules_to_save.{adapter_name}.{k}"
    return keys


def adapter_state_dict(peft_model: nn.Module, adapter_name: str, config: LoraConfig,
                       state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors that make up one adapter, under their on-disk keys (the same set HF PEFT saves). `state`:
    the values to take (default: the model's state_dict()); which keys belong is read off the model."""
    state = other_adapters_removed(peft_model.state_dict() if state is None else state, peft_model, adapter_name)
    selected = adapter_keys(state, peft_model) + bias_keys(state, peft_model, config.bias)
    selected += embedding_keys(state, peft_model, config)
    out = {strip_adapter_name(k, adapter_name): state[k] for k in selected}
    saved_copies = modules_to_save_keys(peft_model, adapter_name).items()
    out.update({disk: state[memory] for disk, memory in saved_copies if memory in state})
    return out


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two keys on one storage (bias="all" with a saved copy): clone the repeats."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save_adapter(peft_model: nn.Module, folder: str | Path, adapter_name: str, config) -> Path:
    target = adapter_folder(folder, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    config.save(target)
    safetensors_io.write(unshared(adapter_state_dict(peft_model, adapter_name, config)), target / WEIGHTS_NAME)
    return target


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: expected an adapter saved by peftcore or HF PEFT")
    return read_json_object(path)


def config_from_dict(d: dict, source: str = CONFIG_NAME):
    """Dispatch on peft_type; a method peftcore does not know is a clear error. `source`: the file, for errors."""
    peft_type = d.get("peft_type")
    if peft_type not in CONFIG_CLASSES:
        known = ", ".join(CONFIG_CLASSES)
        raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; peftcore supports {known}")
    return CONFIG_CLASSES[peft_type].from_dict(d, source)


def load_config(folder: str | Path):
    return config_from_dict(read_adapter_config(folder), str(Path(folder) / CONFIG_NAME))


def load_config_for(folder: str | Path, is_trainable: bool):
    """The saved config, set for inference or training. A reparameterised prompt (P-tuning, a prefix
    projection) can only resume training when its encoder weights were saved too."""
    config = load_config(folder)
    reparameterized = (isinstance(config, PromptEncoderConfig)
                       or isinstance(config, PrefixTuningConfig) and config.prefix_projection)
    if is_trainable and reparameterized and not has_encoder_weights(folder):
        raise ValueError(
            f"{folder} holds only the prompts this {config.peft_type.value} encoder produced, not the encoder: "
            "resume training from a folder saved with save_pretrained(..., save_prompt_encoder=True)"
        )
    config.inference_mode = not is_trainable
    return config


def adapter_weights(folder: str | Path):
    """-> (the weights file, {key: shape}, its (key, tensor) pairs): adapter_model.safetensors, else the
    adapter_model.bin of a PEFT save with safe_serialization=False. Every adapter read goes through here.
    Shapes come first so that a load checks every key before it copies anything; safetensors tensors are
    then read one at a time, not all at once."""
    path = Path(folder) / WEIGHTS_NAME
    if path.is_file():
        header, _ = safetensors_io.read_header(path)
        return path, {k: tuple(v["shape"]) for k, v in header.items()}, safetensors_io.iter_tensors(path)
    path = Path(folder) / LEGACY_WEIGHTS_NAME
    if path.is_file():
        tensors = read_bin(path)
        return path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors.items()
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {folder}: expected the adapter's weights")


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickle, which can run any code when loaded: torch.load with weights_only=True rebuilds tensors and plain
    containers only and refuses every other global (a class, os.system) before calling it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for a global it will not rebuild
        why = next((line.strip() for line in str(e).splitlines() if "nsupported" in line), "a non-tensor object")
        raise ValueError(f"{path} holds more than tensors ({why}), so peftcore does not load it: it runs no code "
                         "from an adapter file. If you trust the file, re-save the adapter as safetensors with "
                         "HF PEFT") from None
    except Exception as e:  # truncated or not torch.save output: EOFError, KeyError, RuntimeError, ...
        raise ValueError(f"{path} is not a torch.save file ({type(e).__name__}: {e}); re-save the adapter") from None
    tensors_only = isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    if not tensors_only:
        raise ValueError(f"{path} holds more than tensors (a {type(state).__name__}, not {{key: tensor}}): "
                         "re-save the adapter")
    return state


def load_map(peft_model: nn.Module, adapter_name: str, state: dict) -> tuple[dict[str, str], set[str]]:
    """-> (on-disk key -> in-memory key for everything a file may hold, the in-memory keys it must hold)."""
    state = other_adapters_removed(state, peft_model, adapter_name)
    to_memory = {strip_adapter_name(k, adapter_name): k for k in state}
    saved_copies = modules_to_save_keys(peft_model, adapter_name)
    to_memory.update(saved_copies)
    required = {k for k in adapter_keys(state, peft_model) if k != strip_adapter_name(k, adapter_name)}
    return to_memory, required | set(saved_copies.values())


def load_adapter_weights(peft_model: nn.Module, folder: str | Path, adapter_name: str, config) -> None:
    """Copy the file's tensors into the model; every key must fit by name and shape (checked first).

    Besides the adapter's own tensors a PEFT file may hold base tensors (biases for bias="all" /
    "lora_only", a targeted embedding table): those load into the base model, as in PEFT.
    """
    path, shapes, tensors = adapter_weights(folder)
    state = peft_model.state_dict(keep_vars=True)
    to_memory, required = load_map(peft_model, adapter_name, state)
    check_fits(path, shapes, state, to_memory, required, adapter_name)
    load_tensors(peft_model, state, ((to_memory[key], tensor) for key, tensor in tensors))


def load_tensors(model: nn.Module, state: dict, pairs) -> None:
    """(in-memory key, tensor) pairs into `model`, whose `state` is state_dict(keep_vars=True): copied into the
    tensor there, or, for a meta tensor (low_cpu_mem_usage), a parameter made from the file's tensor takes
    its place, in its dtype, on its adapter layer's device (copy_ into a meta tensor silently does nothing)."""
    devices = None
    with torch.no_grad():
        for key, tensor in pairs:
            target = state[key]
            if not target.is_meta:
                target.copy_(tensor)
                continue
            devices = base_devices(model) if devices is None else devices
            owner, _, leaf = key.rpartition(".")
            device = devices[max((name for name in devices if key.startswith(f"{name}.")), key=len)]
            value = nn.Parameter(tensor.to(device=device, dtype=target.dtype), requires_grad=target.requires_grad)
            model.get_submodule(owner)._parameters[leaf] = value


def base_devices(model: nn.Module) -> dict[str, torch.device]:
    """LoRA layer name -> the device of the base layer it wraps (a quantized base holds buffers only)."""
    return {name: next(t for t in (*m.base_layer.parameters(), *m.base_layer.buffers())).device
            for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def check_fits(path: Path, shapes: dict, state: dict, to_memory: dict, required: set, adapter_name: str) -> None:
    """Every key of the file names a tensor of the model with its shape; every adapter tensor is there."""
    for key, shape in shapes.items():
        if key not in to_memory:
            raise AdapterLoadError(f"{path.name}: key {key} fits no parameter of the model (another base model?)")
        expected = tuple(state[to_memory[key]].shape)
        if shape != expected:
            raise AdapterLoadError(f"{path.name}: {key} has shape {shape} but the model expects {expected}")
    missing = sorted(strip_adapter_name(k, adapter_name) for k in required - {to_memory[k] for k in shapes})
    if missing:
        raise AdapterLoadError(f"{path.name} lacks {len(missing)} adapter tensor(s), e.g. {', '.join(missing[:4])}")


ENCODER_WEIGHTS_NAME = "prompt_encoder.safetensors"  # peftcore's addition: the full encoder, to resume training


def save_prompt_adapter(encoder: nn.Module, folder: str | Path, adapter_name: str, config,
                        save_prompt_encoder: bool) -> Path:
    """PEFT's files (`prompt_embeddings` = the encoder's output) and, if asked, the encoder's own weights."""
    target = adapter_folder(folder, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    config.save(target)
    safetensors_io.write(saved_prompt_tensors(encoder, config), target / WEIGHTS_NAME)
    if save_prompt_encoder:
        safetensors_io.write(dict(encoder.state_dict()), target / ENCODER_WEIGHTS_NAME)
    return target


def has_encoder_weights(folder: str | Path) -> bool:
    return (Path(folder) / ENCODER_WEIGHTS_NAME).is_file()


def load_prompt_adapter(encoder: nn.Module, folder: str | Path) -> None:
    """Full encoder weights when present (training resumes), else the saved prompts (inference)."""
    folder = Path(folder)
    if has_encoder_weights(folder) and getattr(encoder, "reparameterize", getattr(encoder, "prefix_projection", False)):
        state = dict(safetensors_io.iter_tensors(folder / ENCODER_WEIGHTS_NAME))
        wanted = encoder.state_dict()
        bad = [k for k in wanted if k not in state or state[k].shape != wanted[k].shape]
        if bad or set(state) - set(wanted):
            raise AdapterLoadError(f"{ENCODER_WEIGHTS_NAME} does not fit this encoder "
                                   f"(first mismatch: {(bad or sorted(set(state) - set(wanted)))[0]})")
        encoder.load_state_dict(state)
        return
    path, _, tensors = adapter_weights(folder)
    tensors = dict(tensors)
    if "prompt_embeddings" not in tensors:
        raise AdapterLoadError(f"{path.name} holds no prompt_embeddings (found: {', '.join(sorted(tensors))})")
    load_prompt_embeddings(encoder, tensors["prompt_embeddings"], path.name)


MODEL_CARD_NAME = "README.md"
CARD_MARK = "<!-- written by peftcore save_pretrained; a README.md without this line is never overwritten -->"


def write_model_card(folder: str | Path, configs: dict) -> None:
    """PEFT's save_pretrained writes a README.md model card beside the adapters (the Hub reads its header):
    ours says what is known for certain (base model, method, library), with no template to fill and no
    network. A card a person wrote (no CARD_MARK) is left as it is."""
    path = Path(folder) / MODEL_CARD_NAME
    if path.is_file() and CARD_MARK not in path.read_text(encoding="utf-8", errors="replace"):
        return
    bases = sorted({c.base_model_name_or_path for c in configs.values() if c.base_model_name_or_path})
    types = sorted({c.peft_type.value for c in configs.values()})
    tags = [f"base_model:adapter:{b}" for b in bases] + ["lora"] * ("LORA" in types) + ["peftcore"]
    # JSON strings are YAML's double-quoted scalars: a path with ": " or "#" in it stays one value
    header = ["---", *(f"base_model: {json.dumps(b)}" for b in bases[:1]), "library_name: peft", "tags:",
              *(f"- {json.dumps(t)}" for t in tags), "---"]
    rows = [f"- `{name}` ({c.peft_type.value}): {'this folder' if name == 'default' else f'`{name}/`'}"
            for name, c in configs.items()]
    body = [CARD_MARK, "", f"# {' / '.join(types)} adapter for {bases[0] if bases else 'a base model'}", "",
            "HF PEFT's adapter format (adapter_config.json + adapter_model.safetensors): it loads with",
            "`peft.PeftModel.from_pretrained(base, folder)` as well as with peftcore's.", "", *rows, "",
            "### Framework versions", "", f"- peftcore {__version__}", f"- PEFT format {PEFT_FORMAT_VERSION}"]
    path.write_text("\n".join(header + [""] + body) + "\n", encoding="utf-8")
