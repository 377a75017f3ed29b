"""HF checkpoint folders <-> our models: config dispatch, tensor-by-tensor loading, saving.

A model family plugs in by registering its architectures (see `families.py`). Every model class
provides:
  - `config_class` with `from_hf(dict)` and `to_hf() -> dict` (a complete config.json),
  - `__init__(config)` that builds only modules (cheap on the meta device),
  - `checkpoint_key(key) -> str | None`: a checkpoint's key as our state-dict key (None: skip it),
  - `init_buffers()`: recompute non-persistent buffers (RoPE tables) after loading,
  - `tie_weights()`: re-point tied parameters (may be a no-op).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from peftcore.kernels.gguf_blocks import BlockWeight

from . import safetensors_io
from .families import ARCHITECTURES, DEFAULT_ARCHITECTURE


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the model it describes."""


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face checkpoint folder")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None


def model_class_for(hf_config: dict) -> type[nn.Module]:
    """Dispatch on `architectures[0]` when we know it, else on `model_type`."""
    for arch in hf_config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    if model_type not in DEFAULT_ARCHITECTURE:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(DEFAULT_ARCHITECTURE))}"
        )
    return ARCHITECTURES[DEFAULT_ARCHITECTURE[model_type]]


def from_config(config, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """A randomly initialised model from a config object or a config.json dict."""
    if isinstance(config, dict):
        cls = model_class_for(config)
        config = cls.config_class.from_hf(config)
    else:
        if not any(isinstance(config, c.config_class) for c in ARCHITECTURES.values()):
            known = sorted({c.config_class.__name__ for c in ARCHITECTURES.values()})
            raise TypeError(f"from_config got a {type(config).__name__}; "
                            f"expected a config.json dict or one of {', '.join(known)}")
        cls = model_class_for(config.to_hf())  # the architecture a config names (BERT: encoder or classifier)
    model = cls(config).to(device=device, dtype=dtype)
    model.init_buffers()  # derived tables (RoPE frequencies) in fp32 whatever dtype the weights take
    return model


def checkpoint_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no \"weight_map\" object (tensor name -> shard file)")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(absent)}")
        return files
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path} (found: {', '.join(found) or 'nothing'}); "
        "peftcore reads safetensors only"
    )


def expected_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and persistent buffers, by state-dict key."""
    keys = dict(model.named_parameters())
    non_persistent = {
        f"{name}.{b}" if name else b for name, mod in model.named_modules() for b in mod._non_persistent_buffers_set
    }
    keys.update({k: v for k, v in model.named_buffers() if k not in non_persistent})
    return keys


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


class _SkipRandomInit(TorchFunctionMode):
    """Make random in-place fills no-ops while building on the meta device.

    Meta tensors hold no data, so the fills do nothing anyway; but `normal_` has no C++ meta
    kernel and its Python decomposition imports torch._refs and sympy: ~150 MB of RSS and ~1 s,
    more than a small checkpoint itself weighs.
    """

    FILLS = {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.erfinv_,
        # nn.init dispatches itself as one function, so the Tensor method inside is never seen here
        nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_uniform_,
        nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in self.FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_on_meta(hf_config: dict) -> nn.Module:
    """The model a config.json describes, every parameter on the meta device (no memory, no init)."""
    cls = model_class_for(hf_config)
    with torch.device("meta"), _SkipRandomInit():
        model = cls(cls.config_class.from_hf(hf_config))
    model.tie_weights()
    return model


def load_pretrained(path, dtype: torch.dtype | None = None, device=None, quantize: str | None = None,
                    group_size: int | None = None, double_quant: bool = False) -> nn.Module:
    """Build on the meta device, then fill in tensor by tensor: peak RAM ~ one copy of the model.

    `path`: a Hugging Face checkpoint folder, or a llama.cpp .gguf file (see load_gguf).
    dtype None keeps each tensor's stored dtype (transformers' `dtype="auto"`). `quantize` ("nf4",
    "int4", "int8") turns every linear but the heads into a QuantLinear, quantizing each weight as
    it is read: peak RAM ~ the quantized model plus one dense tensor, so a model whose dense
    weights do not fit in memory still loads.
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype, device, quantize, group_size, double_quant)
    if quantize == "keep":
        raise ValueError(f"quantize='keep' keeps a GGUF file's own blocks; {path} is a checkpoint folder "
                         "(quantize it with nf4, int4 or int8)")
    model = build_on_meta(read_config(path))
    quantized = quantize_on_meta(model, quantize, group_size, double_quant, dtype) if quantize else {}
    shards = ((file, safetensors_io.iter_tensors(file)) for file in checkpoint_files(path))
    return fill(model, quantized, shards, dtype, device, Source(path))


def load_gguf(path, dtype: torch.dtype | None = None, device=None, quantize: str | None = None,
              group_size: int | None = None, double_quant: bool = False) -> nn.Module:
    """A llama.cpp GGUF file of a Llama / Mistral / Qwen2 model as our LlamaForCausalLM (gguf_llama.py).

    Each tensor is dequantized to float32 as it is read, so dtype None gives float32 (as transformers'
    GGUF loading); `quantize` then re-quantizes each weight as load_pretrained does. quantize="keep"
    keeps the linears stored as Q8_0 / Q4_0 / Q4_1 / Q5_x / K-quant blocks as they are (QuantLinear with
    that method, no re-quantization error: LoRA trains against the weights llama.cpp runs); dtype is
    then the compute dtype, and F32 / F16 linears and the heads stay dense.
    """
    from .gguf_llama import GGUFConfigError, gguf_name, open_gguf_checkpoint  # deferred: GGUF paths only

    path = Path(path)
    kept: set[str] = set()  # filled before the tensors are read: those come as blocks
    try:
        gguf = open_gguf_checkpoint(path, keep=kept)
    except GGUFConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_on_meta(gguf.hf_config)
    if quantize == "keep":
        quantized = keep_on_meta(model, gguf.types, dtype)
        kept.update(quantized)
    else:
        quantized = quantize_on_meta(model, quantize, group_size, double_quant, dtype) if quantize else {}
    source = Source(path, "GGUF metadata", gguf_name, tuple(gguf.unexpected))
    return fill(model, quantized, [(path, gguf.tensors)], dtype, device, source)


class Source(NamedTuple):
    """Where tensors come from, for error messages."""
    path: Path
    built_from: str = "config.json"  # what the model was built from
    stored_name: Callable[[str], str] = str  # our key -> the name the file gives the tensor
    unexpected: tuple[str, ...] = ()  # stored names known up front to fit no key


def fill(model: nn.Module, quantized: dict, shards, dtype, device, source: Source) -> nn.Module:
    """Fill a model built on the meta device from `shards`, [(file, iterator of (checkpoint key, tensor))]."""
    wanted = expected_keys(model)
    loaded: set[str] = set()
    unexpected = list(source.unexpected)
    for file, tensors in shards:
        for ckpt_key, tensor in tensors:
            key = model.checkpoint_key(ckpt_key)
            if key is None:
                continue
            if key not in wanted and key not in quantized:
                unexpected.append(source.stored_name(ckpt_key))
                continue
            if isinstance(tensor, BlockWeight):  # quantize="keep": the file's blocks, as they are
                quantized[key].load_block_weight(tensor)
                quantized[key].to(device)
                loaded.add(key)
                continue
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype)
            tensor = tensor.to(device) if device is not None else tensor
            name = source.stored_name(ckpt_key)
            if key in quantized:
                layer = quantized[key]
                stored = ((layer.in_features, layer.out_features) if layer.conv1d_layout
                          else (layer.out_features, layer.in_features))
                check_shape(name, tensor, torch.empty(stored, device="meta"), file, source.built_from)
                layer.load_dense_weight(tensor.T if layer.conv1d_layout else tensor)
                del tensor
                release_freed_memory()
            else:
                check_shape(name, tensor, wanted[key], file, source.built_from)
                set_tensor(model, key, tensor)
            loaded.add(key)
    missing = [source.stored_name(k) for k in sorted((set(wanted) | set(quantized)) - loaded)]
    report_key_mismatch(source.path, missing, unexpected, source.built_from)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim). Between quantized tensors glibc
    otherwise keeps the dense weights' freed pages: measured 0.4-1.0x the fp32 checkpoint of extra
    RSS on a 110 MB model, against ~0.25x with trimming."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def quantize_on_meta(model: nn.Module, method: str, group_size, double_quant: bool, dtype) -> dict[str, nn.Module]:
    """Swap linears for empty QuantLinears (filled while loading). -> {"<name>.weight": layer}."""
    from .layers import Conv1D
    from .quantized import SKIP_BY_DEFAULT, QuantLinear, quantizable

    layers = {}
    for name, module in list(model.named_modules()):
        if not quantizable(name, module, SKIP_BY_DEFAULT):
            continue
        with torch.device("meta"):
            layer = QuantLinear(module.in_features, module.out_features, method, module.bias is not None,
                                group_size, double_quant, dtype or torch.float32)
        layer.conv1d_layout = isinstance(module, Conv1D)  # GPT-2: the checkpoint holds (in, out)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[f"{name}.weight"] = layer
    return layers


def keep_on_meta(model: nn.Module, types: dict[str, int], dtype) -> dict[str, nn.Module]:
    """Swap the linears the file stores in a block format for empty QuantLinears of that format.
    -> {"<name>.weight": layer}, filled from the file's blocks while loading."""
    from .quantized import BLOCK_METHODS, GGML_TYPE_OF, SKIP_BY_DEFAULT, QuantLinear, quantizable

    methods = {t: m for m, t in GGML_TYPE_OF.items() if m in BLOCK_METHODS}
    layers = {}
    for name, module in list(model.named_modules()):
        ggml_type = types.get(f"{name}.weight")
        if ggml_type not in methods or not quantizable(name, module, SKIP_BY_DEFAULT):
            continue
        with torch.device("meta"):
            layer = QuantLinear(module.in_features, module.out_features, methods[ggml_type], module.bias is not None,
                                dtype=dtype or torch.float32)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[f"{name}.weight"] = layer
    return layers


def check_shape(key: str, tensor: torch.Tensor, expected: torch.Tensor, file: Path,
                built_from: str = "config.json") -> None:
    if tuple(tensor.shape) != tuple(expected.shape):
        raise CheckpointError(
            f"{file.name}: {key} has shape {tuple(tensor.shape)} but the model built from {built_from} "
            f"expects {tuple(expected.shape)}"
        )


def report_key_mismatch(path: Path, missing: list[str], unexpected: list[str],
                        built_from: str = "config.json") -> None:
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): "
                     f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    raise CheckpointError(f"checkpoint {path} does not match its {built_from}: " + "; ".join(parts))


def save_pretrained(model: nn.Module, path) -> None:
    """config.json + model.safetensors that transformers' `from_pretrained` loads (tied weights once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in expected_keys(model).items()}
    hf_config = model.config.to_hf()
    hf_config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    safetensors_io.write(state, path / "model.safetensors")
