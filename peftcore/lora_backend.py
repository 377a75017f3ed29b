"""The LoRA backend of a PeftModel: LoRA layers (and modules_to_save copies) swapped into the user's model.

They change weights, so they merge. The module-level functions do the work on any nn.Module, so that
`peftcore.functional.inject_adapter_in_model` (PEFT's name: LoRA layers without a PeftModel) shares them
with the backend. Here, not in lora/, because the backend reads and writes adapter files (adapter_io),
which sits above lora/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from peftcore import adapter_io
from peftcore.config import LoraConfig, TaskType
from peftcore.lora.inject import SEQ_CLS_HEAD_NAMES, inject_lora, set_submodule
from peftcore.lora.layer import Magnitude, weight_before_merges
from peftcore.lora.mha import LoraMultiheadAttention
from peftcore.lora.modules_to_save import ModulesToSave, wrap_modules_to_save
from peftcore.lora.registry import LORA_LAYERS
from peftcore.lora.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper, wrap_token_rows
from peftcore.methods import ADAPTER_LAYERS as METHOD_LAYERS
from peftcore.methods import LAYER_METHOD_CONFIGS, fit_layers_to_file, method_of, trains_adapted_biases
from peftcore.models.generate import generate as generate_tokens


class LoraModel(nn.Module):
    """Holds the user's model under `.model` (PEFT's nesting: keys read `base_model.model....`), and the
    training-time state of methods that have some (AdaLoRA's rank allocator), under PEFT's names."""

    def __init__(self, model: nn.Module, peft_config: dict):
        super().__init__()
        self.model = model
        self.peft_config = peft_config  # the PeftModel's {name: config}, the same dict
        self.method_hooks: dict[str, object] = {}  # adapter name -> its method's training hook

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def trained_hooks(self) -> list:
        """The step hooks of the adapters that train (AdaLoRA's RankAllocator), made when first asked for."""
        hooks = []
        for name, config in self.peft_config.items():
            method = method_of(config)
            if method.step_hook is None or config.inference_mode:
                continue
            if name not in self.method_hooks:
                self.method_hooks[name] = method.step_hook(self.model, config, name)
            hooks.append(self.method_hooks[name])
        return hooks

    def allocator(self):
        """The trainable AdaLoRA adapter's RankAllocator (AttributeError without one, as PEFT's missing attribute)."""
        hooks = self.trained_hooks()
        if not hooks:
            raise AttributeError("no trainable AdaLoRA adapter: the rank allocator needs one (load it with "
                                 "is_trainable=True)")
        return hooks[0]

    @property
    def rankallocator(self):
        """PEFT's AdaLoraModel.rankallocator. (Without one, __getattr__ reads through to the model, as PEFT's
        hasattr(base_model, "rankallocator") is False.)"""
        return self.allocator()

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate, for hand-written loops: call it after optimizer.step() and
        before zero_grad() (it reads the gradients), with the 0-based step. `peftcore train` does it itself."""
        self.allocator().update_and_allocate(global_step)

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (`config`, ...) read through, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


# -- work on any model with LoRA layers ------------------------------------------------------------
ADAPTER_LAYERS = (*METHOD_LAYERS, ModulesToSave, TrainableTokensLayer)  # what holds adapters' tensors
ADAPTER_WRAPPERS = (*METHOD_LAYERS, ModulesToSave, TrainableTokensWrapper)  # what unload swaps back
MERGEABLE = (*METHOD_LAYERS, TrainableTokensLayer)


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ADAPTER_LAYERS)]


def held_adapters(layer: nn.Module, names) -> list[str]:
    """Those of `names` (adapter names) with tensors in `layer`."""
    if isinstance(layer, ModulesToSave):
        return [n for n in names if n in layer.modules_to_save]
    if isinstance(layer, TrainableTokensLayer):
        return [n for n in names if n in layer.token_indices]
    if isinstance(layer, LORA_LAYERS):
        return [n for n in names if n in layer.r]
    return [n for n in names if next(iter(layer.adapter_params(n)), None) is not None]


def check_one_bias(configs: dict, adapter_name: str, config: LoraConfig) -> None:
    """As PEFT's BaseTuner._check_new_adapter_config: one adapter at most trains base biases (two would
    train, and each save, the same bias tensors)."""
    other = next((n for n, c in configs.items() if getattr(c, "bias", "none") != "none"), None)
    if getattr(config, "bias", "none") != "none" and other is not None:
        raise ValueError(f"adapter {adapter_name!r} has bias={config.bias!r} but adapter {other!r} trains "
                         f"biases already (bias={configs[other].bias!r}): only one adapter may train "
                         "biases, as in HF PEFT; set bias='none' for one of them")


def check_same_parameters(configs: dict, adapter_name: str, config: LoraConfig) -> None:
    """As PEFT: every adapter with target_parameters targets the same ones (they nest into one set of wrappers)."""
    for other, other_config in configs.items():
        if config.target_parameters and getattr(other_config, "target_parameters", None) \
                and set(config.target_parameters) != set(other_config.target_parameters):
            raise ValueError(f"adapter {adapter_name!r} targets parameters {sorted(config.target_parameters)} but "
                             f"adapter {other!r} {sorted(other_config.target_parameters)}: adapters with "
                             "target_parameters must all target the same ones, as in HF PEFT")


def check_one_method(configs: dict, adapter_name: str, config) -> None:
    """As PEFT's PeftModel: the adapters of one model are of one method (their layers would wrap each other)."""
    other = next((n for n, c in configs.items() if method_of(c) is not method_of(config)), None)
    if other is not None:
        raise ValueError(f"adapter {adapter_name!r} is {method_of(config).name} but adapter {other!r} is "
                         f"{method_of(configs[other]).name}: one model holds adapters of one method, as in HF PEFT")


def add_method_adapter(model: nn.Module, configs: dict, name: str, config, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, holder: nn.Module | None = None) -> None:
    """Inject adapter `name` of any layer method (methods.METHODS) into `model`; `configs`: the adapters it has.
    For the methods but LoRA, low_cpu_mem_usage changes nothing: their layers are built with their init values
    (vectors and small rotations, no memory to speak of), which the loaded weights then overwrite. `holder`: where
    model-wide tensors go (VeRA's projections; default `model`; a PeftModel passes its base_model, PEFT's place)."""
    check_one_method(configs, name, config)
    method = method_of(config)
    if method.check_new is not None:
        method.check_new(configs, name, config)
    if method.inject is None:
        return add_lora(model, configs, name, config, autocast_adapter_dtype, low_cpu_mem_usage)
    check_one_bias(configs, name, config)
    add_head_to_modules_to_save(config)
    shared = {"holder": holder} if method.shares_state else {}
    method.inject(model, config, name, autocast_adapter_dtype=autocast_adapter_dtype, **shared)
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, name)


def add_head_to_modules_to_save(config) -> None:
    if config.task_type == TaskType.SEQ_CLS:  # PEFT trains (and saves) the classification head too
        config.modules_to_save = list(config.modules_to_save or [])
        config.modules_to_save += [m for m in SEQ_CLS_HEAD_NAMES if m not in config.modules_to_save]


def add_lora(model: nn.Module, configs: dict, name: str, config: LoraConfig, autocast_adapter_dtype: bool = True,
             low_cpu_mem_usage: bool = False) -> None:
    """Inject adapter `name` (LoRA layers, modules_to_save copies) into `model`; `configs`: the adapters it has."""
    check_one_bias(configs, name, config)
    check_same_parameters(configs, name, config)
    if config.use_dora and config.target_parameters:  # checked here too: inject_on_meta injects without DoRA
        raise ValueError("use_dora=True does not work with target_parameters (as in HF PEFT)")
    add_head_to_modules_to_save(config)
    if low_cpu_mem_usage:
        inject_on_meta(model, config, name, autocast_adapter_dtype)
    else:
        inject_lora(model, config, name, autocast_adapter_dtype)
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, name)
    if config.trainable_token_indices is not None:
        wrap_token_rows(model, config.trainable_token_indices, name, config.modules_to_save)


def inject_on_meta(model: nn.Module, config: LoraConfig, name: str, autocast_adapter_dtype: bool) -> None:
    """PEFT's low_cpu_mem_usage: the adapter's tensors are created on the meta device (no memory, no init)
    and the loaded weights take their place (adapter_io.load_tensors). No init runs at all: PiSSA / OLoRA
    leave the base weight as it is, as PEFT skips them on meta tensors; DoRA's magnitude, which
    the layer would compute from the base weight, is an empty meta vector too."""
    empty = dataclasses.replace(config, init_lora_weights=False, use_dora=False, loftq_config={})
    with parameters_on_meta():
        layers = inject_lora(model, empty, name, autocast_adapter_dtype)
        if config.use_dora:
            for layer in layers.values():
                if isinstance(layer, LoraMultiheadAttention):  # inject_lora's refusal, skipped by the DoRA-less copy
                    raise ValueError("use_dora=True does not work with nn.MultiheadAttention (as in HF PEFT)")
                dtype = next(layer.adapter_params(name)).dtype
                layer.lora_magnitude_vector[name] = Magnitude(torch.empty(layer.out_features, dtype=dtype))
    config.target_modules = empty.target_modules  # "all-linear" expanded, as inject_lora does on the config


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside moves to the meta device as it is registered (accelerate's and PEFT's
    init_empty_weights): nn.Linear allocates torch.empty, which is never written, and its reset_parameters
    (kaiming) then runs on the meta tensor, computing nothing. Embedding factors are drawn before they are
    registered, as in PEFT: (r, vocab) and (dim, r) values, freed at once."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def activate(model: nn.Module, names: list[str], configs: dict) -> None:
    """`names` run (their terms add up in every layer, as PEFT's layers loop over active_adapters) and train,
    unless loaded for inference; every other adapter is frozen. A modules_to_save copy stands for one adapter,
    so two active adapters with copies of one module are refused (PEFT's ValueError), before anything changes."""
    layers = adapter_layers(model)
    for layer in layers:
        if isinstance(layer, ModulesToSave) and len([n for n in names if n in layer.modules_to_save]) > 1:
            raise ValueError(f"adapters {', '.join(n for n in names if n in layer.modules_to_save)} each have a "
                             "modules_to_save copy of the same module; only one of them can be active at a time")
    for layer in layers:
        held = held_adapters(layer, configs)
        layer.active_adapters = list(names) if isinstance(layer, LORA_LAYERS) else [n for n in names if n in held]
        for adapter in held:
            for p in layer.adapter_params(adapter):
                p.requires_grad_(adapter in names and not configs[adapter].inference_mode)
    for name in names:
        set_bias_trainable(model, configs[name])


def set_bias_trainable(model: nn.Module, config: LoraConfig) -> None:
    trainable, bias = not config.inference_mode, getattr(config, "bias", "none")  # IA3 has no bias option
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ".lora_" not in name and "original_module." not in name:
                p.requires_grad_(trainable)
    elif trains_adapted_biases(bias):
        for layer in model.modules():
            # getattr: an nn.Embedding base has no bias attribute at all
            if isinstance(layer, METHOD_LAYERS) and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(trainable)


def check_merge_is_finite(layer: nn.Module, names: list[str]) -> None:
    """safe_merge, as PEFT's: the weight each pending merge would write, computed on a copy, must be finite
    (else PEFT's ValueError, naming the adapter). Each merge is replayed as merge_weights does it: W + s*B*A, for
    DoRA then times m / ||W0 + s*B*A|| with W0 the weight before any merge; a lora_bias adds s*b to the bias."""
    pending = [n for n in names if n in layer.r and n not in layer.merged_adapters]
    if not pending:
        return
    get_param = getattr(layer, "get_param", None)  # a ParamWrapper merges into its parameter (no lora_bias there)
    W = (get_param() if get_param else layer.base_layer.weight).detach()
    merged, bias = W.clone(), None if get_param else getattr(layer.base_layer, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    for name in pending:
        merged += layer.delta_weight(name).detach().to(W.dtype)
        if name in layer.lora_magnitude_vector:
            merged *= dora_factor(layer, name).to(W.dtype)
        lora_B = layer.lora_B[name] if hasattr(layer, "lora_B") else None  # embeddings have no lora_bias
        if bias is not None and lora_B is not None and lora_B.bias is not None:
            bias += lora_B.bias.detach().to(bias.dtype) * layer.scaling[name]
        if not torch.isfinite(merged).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")


def check_deltas_are_finite(layer: nn.Module, names: list[str]) -> None:
    """safe_merge for the other methods: what each pending merge adds to the weight must be finite."""
    for name in names:
        if held_adapters(layer, [name]) and name not in layer.merged_adapters \
                and not torch.isfinite(layer.delta_weight(name)).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")


def dora_factor(layer: nn.Module, name: str) -> torch.Tensor:
    """m / ||W0 + s*B*A||, shaped by the layer itself to scale its stored weight (rows, Conv1D or embedding columns,
    conv output channels). dora_factor reads the norm merge_weights records in _merge_norms: it is put there for
    the call and taken out again, so the check leaves the layer as it was."""
    with torch.no_grad():
        norm = layer.dora_norm(weight_before_merges(layer), name)
    layer._merge_norms[name] = norm
    try:
        return layer.dora_factor(name)
    finally:
        del layer._merge_norms[name]


def merge(model: nn.Module, names: list[str], safe_merge: bool = False) -> None:
    layers = [layer for layer in model.modules() if isinstance(layer, MERGEABLE)]  # trained token rows too
    for layer in layers:  # every layer first: a refusal in the last one must not leave the others merged
        layer.check_mergeable(names)
        if safe_merge:  # PEFT checks layer by layer while merging; checking all first leaves nothing half-merged
            (check_merge_is_finite if isinstance(layer, LORA_LAYERS) else check_deltas_are_finite)(layer, names)
    for layer in layers:
        layer.merge(names)


def unload(model: nn.Module) -> nn.Module:
    """Every adapter wrapper replaced by what it wraps. Outermost first, one at a time, until none is left:
    wrappers nest (one per targeted parameter of a module), and a replaced one's inner names change."""
    while (found := next(((n, m) for n, m in model.named_modules() if n and isinstance(m, ADAPTER_WRAPPERS)), None)):
        name, wrapper = found
        set_submodule(model, name, wrapper.active_module() if isinstance(wrapper, ModulesToSave)
                      else wrapper.base_layer)
    return model


class LoraBackend:
    """PeftModel's LoRA kind: the functions above on `peft_model.base_model.model`, plus what needs the
    PeftModel (its configs, mixed batches, files, the disabled state)."""

    config_type = LAYER_METHOD_CONFIGS
    kind = "weight-adapting (LoRA, OFT, ...)"
    is_prompt_learning = False

    def __init__(self, peft_model: nn.Module, model: nn.Module):
        # A plain reference, not a submodule: state-dict keys stay PEFT's (`base_model.model....`).
        self.peft_model = peft_model
        peft_model.base_model = LoraModel(model, peft_model.peft_config)
        self.frozen_while_disabled: list[nn.Parameter] | None = None  # None: adapter layers enabled

    @property
    def model(self) -> nn.Module:
        return self.peft_model.base_model.model

    def layers(self) -> list[nn.Module]:
        return adapter_layers(self.model)

    def add(self, name: str, config: LoraConfig, autocast_adapter_dtype: bool, loading: bool,
            low_cpu_mem_usage: bool = False) -> None:
        # LoftQ's init replaces the base weight with its quantized copy: a loaded LoftQ adapter goes onto the base
        # it is given as that is (the LoftQ base, dense or quantized), made on meta for the file's tensors
        skip_init = loading and getattr(config, "init_lora_weights", None) == "loftq"
        add_method_adapter(self.model, self.peft_model.peft_config, name, config, autocast_adapter_dtype,
                           low_cpu_mem_usage or skip_init, holder=self.peft_model.base_model)

    def activate(self, names: list[str]) -> None:
        activate(self.model, names, self.peft_model.peft_config)

    def make_trainable(self, name: str) -> None:
        for p in self.parameters(name):
            p.requires_grad_(True)
        set_bias_trainable(self.model, self.peft_model.peft_config[name])

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [p for layer in self.layers() for p in layer.adapter_params(name)]

    def delete(self, name: str) -> None:
        for layer in self.layers():
            layer.delete_adapter(name)
        self.peft_model.base_model.method_hooks.pop(name, None)

    def step_hooks(self) -> list:
        """What the training loop runs each step for the adapters that train (training.hooks)."""
        return self.peft_model.base_model.trained_hooks()

    # -- enabled / disabled -----------------------------------------------------------------------
    def is_disabled(self) -> bool:
        return self.frozen_while_disabled is not None

    def disable_layers(self) -> None:
        """The base model alone (merged adapters are unmerged first: PEFT's layers do it at the next forward).
        As in PEFT no adapter trains meanwhile (a step would move weights that took no part in the output);
        PEFT's enable then makes the active adapters trainable, even ones loaded for inference: we restore
        what was set."""
        if self.is_disabled():
            return
        warn_if_biased(self.peft_model.peft_config, self.peft_model.active_adapters)
        if self.is_merged():
            self.unmerge()
        self.frozen_while_disabled = [p for n in self.peft_model.peft_config for p in self.parameters(n)
                                      if p.requires_grad]
        for layer in self.layers():
            layer.disable_adapters = True
        for p in self.frozen_while_disabled:
            p.requires_grad_(False)

    def enable_layers(self) -> None:
        for layer in self.layers():
            layer.disable_adapters = False
        for p in self.frozen_while_disabled or []:
            p.requires_grad_(True)
        self.frozen_while_disabled = None

    @contextlib.contextmanager
    def disabled(self):
        """Inside, the base model alone; on exit the layers are as before (disabled ones stay so, as in PEFT)."""
        was_disabled = self.is_disabled()
        self.disable_layers()
        try:
            yield
        finally:
            if not was_disabled:
                self.enable_layers()

    # -- merging ----------------------------------------------------------------------------------
    def is_merged(self) -> bool:
        return any(layer.merged_adapters for layer in self.layers() if isinstance(layer, MERGEABLE))

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        merge(self.model, names, safe_merge)

    def unmerge(self) -> None:
        for layer in self.layers():
            if isinstance(layer, MERGEABLE):
                layer.unmerge()

    def unload(self) -> nn.Module:
        return unload(self.model)

    # -- running ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: list[str] | None):
        """Route row b of the batch through adapter adapter_names[b] in every adapter layer."""
        if adapter_names is None:
            yield
            return
        self.peft_model.check_known(adapter_names, allow_base=True)
        if self.peft_model.training:
            raise RuntimeError("adapter_names (a mixed-adapter batch) is for inference; call .eval() first")

        def route(mod, args, kwargs):
            return args, {**kwargs, "adapter_names": adapter_names}

        hooks = [layer.register_forward_pre_hook(route, with_kwargs=True) for layer in self.layers()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None):
        with self.batch_adapters(adapter_names):
            return self.peft_model.base_model(*args, **kwargs)

    def generate(self, input_ids, attention_mask, adapter_names, kwargs: dict) -> torch.Tensor:
        with self.batch_adapters(adapter_names):
            return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **kwargs)

    # -- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool, safe_serialization: bool = True,
             save_embedding_layers="auto") -> None:
        adapter_io.save_adapter(self.peft_model, folder, name, self.peft_model.peft_config[name], safe_serialization,
                                save_embedding_layers)

    def load_weights(self, folder: str | Path, name: str, key_mapping: dict[str, str] | None = None,
                     ignore_mismatched_sizes: bool = False) -> None:
        config = self.peft_model.peft_config[name]
        fit_layers_to_file(self.model, config, name)
        adapter_io.load_adapter_weights(self.peft_model, folder, name, config, key_mapping, ignore_mismatched_sizes)


def warn_if_biased(configs: dict, names: list[str]) -> None:
    """PEFT's disable_adapter_layers warning: a trained base bias stays in, so the output is not the base's."""
    for name in names:
        bias = getattr(configs[name], "bias", "none")
        if bias != "none":
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                          "the same output as the base model would without adaption.")
