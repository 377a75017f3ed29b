"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The file holds the keys PEFT writes (adapter_keys: which tensors, under which on-disk keys). The adapter named
"default" lives in the folder, any other in `<folder>/<name>/`.
PEFT's save_pretrained(..., safe_serialization=False) writes `adapter_model.bin` (torch.save of the same tensors)
instead: written so too (`write_weights`), and read with torch.load(weights_only=True) (`adapter_weights`).
Beside the adapters, a README.md model card, as PEFT writes one.
"""
from __future__ import annotations

import copy
import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from peftcore._json import read_json_object
from peftcore._version import __version__
from peftcore.adapter_keys import adapter_state_dict, load_map, strip_adapter_name
from peftcore.config import CONFIG_NAME, PEFT_FORMAT_VERSION, PeftConfig
from peftcore.methods import ADAPTER_LAYERS, LAYER_METHOD_CONFIGS
from peftcore.models import safetensors_io
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.prompt.encoders import load_prompt_embeddings, saved_prompt_tensors

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # HF PEFT's save_pretrained(..., safe_serialization=False)


# The one registry of methods a saved adapter_config.json may name: peft_type -> its config class. Written out
# here, not filled in as a side effect of importing a module, so every supported method is in one table.
CONFIG_CLASSES: dict[str, type[PeftConfig]] = {
    config.peft_type.value: config
    for config in (*LAYER_METHOD_CONFIGS, PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig)
}


class AdapterLoadError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def adapter_folder(folder: str | Path, adapter_name: str) -> Path:
    return Path(folder) if adapter_name == "default" else Path(folder) / adapter_name


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two keys on one storage (bias="all" with a saved copy): clone the repeats."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save_adapter(peft_model: nn.Module, folder: str | Path, adapter_name: str, config,
                 safe_serialization: bool = True, save_embedding_layers="auto") -> Path:
    target = adapter_folder(folder, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    config.save(target)
    write_weights(adapter_state_dict(peft_model, adapter_name, config, None, save_embedding_layers), target,
                  safe_serialization)
    return target


def write_weights(tensors: dict[str, torch.Tensor], target: Path, safe_serialization: bool = True) -> None:
    """adapter_model.safetensors, or with safe_serialization=False PEFT's adapter_model.bin: torch.save of the
    same {key: tensor} (on the CPU), which PEFT and `read_bin` load. A .safetensors an earlier save left beside
    it is removed: every loader (PEFT's too) would read that one instead of the new .bin."""
    if safe_serialization:
        safetensors_io.write(unshared(tensors), target / WEIGHTS_NAME)
        return
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, target / LEGACY_WEIGHTS_NAME)
    (target / WEIGHTS_NAME).unlink(missing_ok=True)


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


def load_config_for(folder: str | Path, is_trainable: bool, config: PeftConfig | None = None):
    """The saved config, set for inference or training (inference_mode = not is_trainable). `config`, PEFT's
    from_pretrained argument, takes the saved one's place (adapter_config.json is not read then): a copy of it
    is set so (PEFT sets the object passed). A reparameterised prompt (P-tuning, a prefix projection) can only
    resume training when its encoder weights were saved too."""
    if config is None:
        config = load_config(folder)
    elif isinstance(config, PeftConfig):
        config = copy.deepcopy(config)
    else:
        kinds = ", ".join(c.__name__ for c in CONFIG_CLASSES.values())
        raise ValueError(f"The input config must be a PeftConfig, got {config.__class__} (peftcore's: {kinds})")
    reparameterized = (isinstance(config, PromptEncoderConfig)
                       or isinstance(config, PrefixTuningConfig) and config.prefix_projection)
    if is_trainable and reparameterized and not has_encoder_weights(folder):
        raise ValueError(
            f"{folder} holds only the prompts this {config.peft_type.value} encoder produced, not the encoder: "
            "resume training from a folder saved with save_pretrained(..., save_prompt_encoder=True)"
        )
    config.inference_mode = not is_trainable
    return config


def adapter_weights(folder: str | Path, key_mapping: dict[str, str] | None = None):
    """-> (the weights file, {key: shape}, its (key, tensor) pairs): adapter_model.safetensors, else the
    adapter_model.bin of a PEFT save with safe_serialization=False. Every adapter read goes through here.
    Shapes come first so that a load checks every key before it copies anything; safetensors tensors are
    then read one at a time, not all at once. `key_mapping`: PEFT's renames (`mapped_keys`)."""
    path, shapes, tensors = read_weights(folder)
    if not key_mapping:
        return path, shapes, tensors
    renamed = mapped_keys(path, list(shapes), key_mapping)
    return path, {renamed[k]: s for k, s in shapes.items()}, ((renamed[k], t) for k, t in tensors)


def mapped_keys(path: Path, keys: list[str], key_mapping: dict[str, str]) -> dict[str, str]:
    """PEFT's key_mapping (load_peft_weights): each key's `base_model.model.` (or `base_model.`) prefix is taken
    off, the first regex of the mapping that matches it rewrites it (re.subn), and the prefix goes back on."""
    renamed = {}
    for key in keys:
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise AdapterLoadError(f"{path.name}: key_mapping renames keys under base_model.model. (PEFT's rule), "
                                   f"but {key} has no such prefix")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            try:
                new, count = re.subn(pattern, replacement, rest)
            except re.error as e:
                raise ValueError(f"key_mapping: {pattern!r} -> {replacement!r} is not a valid regex ({e})") from None
            if count:
                rest = new
                break
        renamed[key] = prefix + rest
    first = {}
    for key, new in renamed.items():
        if first.setdefault(new, key) != key:
            raise AdapterLoadError(f"{path.name}: key_mapping renames both {first[new]} and {key} to {new}")
    return renamed


def read_weights(folder: str | Path):
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


def load_adapter_weights(peft_model: nn.Module, folder: str | Path, adapter_name: str, config,
                         key_mapping: dict[str, str] | None = None, ignore_mismatched_sizes: bool = False) -> None:
    """Copy the file's tensors into the model; every key must fit by name and shape (checked first).

    Besides the adapter's own tensors a PEFT file may hold base tensors (biases for bias="all" /
    "lora_only", a targeted embedding table): those load into the base model, as in PEFT. `key_mapping`: PEFT's
    renames of the file's keys (`mapped_keys`); `ignore_mismatched_sizes`: a tensor whose shape is not the
    model's is skipped with PEFT's warning (`skip_mismatched`) instead of refused.
    """
    path, shapes, tensors = adapter_weights(folder, key_mapping)
    state = peft_model.state_dict(keep_vars=True)
    to_memory, required = load_map(peft_model, adapter_name, state)
    mismatched = check_fits(path, shapes, state, to_memory, required, adapter_name, ignore_mismatched_sizes)
    skipped = skip_mismatched(peft_model, state, mismatched)
    pairs = ((to_memory[key], tensor) for key, tensor in tensors)
    load_tensors(peft_model, state, ((key, tensor) for key, tensor in pairs if key not in skipped))


def skip_mismatched(model: nn.Module, state: dict, mismatched: list[tuple[str, tuple, tuple]]) -> set[str]:
    """ignore_mismatched_sizes, as PEFT's: the (in-memory key, given shape, model shape) tensors are left as they
    are, with PEFT's warning. -> their keys. A tensor on the meta device (low_cpu_mem_usage) would be left with
    no values at all, so that is an error (PEFT leaves it on the meta device)."""
    empty = [key for key, _, _ in mismatched if state[key].is_meta]
    if empty:
        raise AdapterLoadError(f"ignore_mismatched_sizes skips {empty[0]}, which low_cpu_mem_usage made on the meta "
                               "device: it would hold no values. Load without low_cpu_mem_usage")
    if mismatched:
        lines = "\n".join(f"- {key}: found shape {torch.Size(given)} in the checkpoint and {torch.Size(expected)} in "
                          "the model instantiated" for key, given, expected in mismatched)
        warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are "
                      f"being ignored because you passed `ignore_mismatched_sizes=True`: {lines}.")
    return {key for key, _, _ in mismatched}


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
            for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


def check_fits(path: Path, shapes: dict, state: dict, to_memory: dict, required: set, adapter_name: str,
               ignore_mismatched_sizes: bool = False) -> list[tuple[str, tuple, tuple]]:
    """Every key of the file names a tensor of the model with its shape; every adapter tensor is there.
    -> (in-memory key, file shape, model shape) of each shape mismatch that ignore_mismatched_sizes lets by."""
    mismatched = []
    for key, shape in shapes.items():
        if key not in to_memory:
            raise AdapterLoadError(f"{path.name}: key {key} fits no parameter of the model (another base model?)")
        expected = tuple(state[to_memory[key]].shape)
        if shape != expected and not ignore_mismatched_sizes:
            raise AdapterLoadError(f"{path.name}: {key} has shape {shape} but the model expects {expected}")
        if shape != expected:
            mismatched.append((to_memory[key], tuple(shape), expected))
    missing = sorted(strip_adapter_name(k, adapter_name) for k in required - {to_memory[k] for k in shapes})
    if missing:
        raise AdapterLoadError(f"{path.name} lacks {len(missing)} adapter tensor(s), e.g. {', '.join(missing[:4])}")
    return mismatched


ENCODER_WEIGHTS_NAME = "prompt_encoder.safetensors"  # peftcore's addition: the full encoder, to resume training


def save_prompt_adapter(encoder: nn.Module, folder: str | Path, adapter_name: str, config,
                        save_prompt_encoder: bool, safe_serialization: bool = True) -> Path:
    """PEFT's files (`prompt_embeddings` = the encoder's output) and, if asked, the encoder's own weights
    (always safetensors: peftcore's own file)."""
    target = adapter_folder(folder, adapter_name)
    target.mkdir(parents=True, exist_ok=True)
    config.save(target)
    write_weights(saved_prompt_tensors(encoder, config), target, safe_serialization)
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
