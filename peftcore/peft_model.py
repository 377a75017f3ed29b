"""PeftModel: a base model with named adapters, and the adapter lifecycle around it.

Layout and names follow HF PEFT so state dicts and files line up. LoRA: `peft_model.base_model.model`
is the user's model with LoRA layers swapped in (keys `base_model.model.<module path>...`). Prompt
methods: `peft_model.base_model` is the untouched user's model and `peft_model.prompt_encoder[name]`
makes the prompt; one PeftModel holds adapters of one kind, as in PEFT.

PeftModel owns what every kind shares (adapters by name, which one is active, configs, files, parameter
counts); what a kind does to the model is its backend's (`AdapterBackend`), chosen once from the first config.
The backends live here, not in lora/ and prompt/, because they read and write adapter files (adapter_io),
which sits above both.
"""
from __future__ import annotations

import contextlib
import copy
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from peftcore import adapter_io
from peftcore.config import LoraConfig, PeftConfig, TaskType
from peftcore.lora.inject import SEQ_CLS_HEAD_NAMES, inject_lora, set_submodule
from peftcore.lora.layer import LORA_LAYERS
from peftcore.lora.modules_to_save import ModulesToSave, wrap_modules_to_save
from peftcore.models.generate import generate as generate_tokens
from peftcore.prompt.configs import PromptLearningConfig
from peftcore.prompt.encoders import encoder_for, input_embeddings, prompt_prefill, prompted_forward

BASE = "__base__"  # adapter_names entry for a row that runs the base model only


class AdapterBackend(Protocol):
    """What one kind of adapter does to the model; PeftModel keeps names, configs and the active adapter."""

    config_type: type[PeftConfig]
    kind: str  # for messages: "LoRA" / "prompt-learning"
    is_prompt_learning: bool

    @property
    def model(self) -> nn.Module: ...  # the user's model (with adapter layers swapped in, for LoRA)
    def add(self, name: str, config: PeftConfig, autocast_adapter_dtype: bool, loading: bool) -> None: ...
    def activate(self, name: str) -> None: ...  # `name` runs and trains (unless inference_mode); others frozen
    def make_trainable(self, name: str) -> None: ...  # `name` trains too, the others keep their requires_grad
    def parameters(self, name: str) -> list[nn.Parameter]: ...
    def delete(self, name: str) -> None: ...
    def disabled(self) -> ContextManager: ...
    def is_merged(self) -> bool: ...
    def merge(self, names: list[str]) -> None: ...
    def unmerge(self) -> None: ...
    def unload(self) -> nn.Module: ...
    def forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None): ...
    def generate(self, input_ids, attention_mask, adapter_names: list[str] | None, kwargs: dict) -> torch.Tensor: ...
    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool) -> None: ...
    def load_weights(self, folder: str | Path, name: str) -> None: ...


class LoraModel(nn.Module):
    """Holds the user's model under `.model` (PEFT's nesting: keys read `base_model.model....`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (`config`, ...) read through, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class LoraBackend:
    """LoRA layers (and modules_to_save copies) swapped into the model; they change weights, so they merge."""

    config_type = LoraConfig
    kind = "LoRA"
    is_prompt_learning = False

    def __init__(self, peft_model: PeftModel, model: nn.Module):
        # A plain reference, not a submodule: state-dict keys stay PEFT's (`base_model.model....`).
        self.peft_model = peft_model
        peft_model.base_model = LoraModel(model)

    @property
    def model(self) -> nn.Module:
        return self.peft_model.base_model.model

    def layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, (*LORA_LAYERS, ModulesToSave))]

    def add(self, name: str, config: LoraConfig, autocast_adapter_dtype: bool, loading: bool) -> None:
        self.check_one_bias(name, config)
        if config.task_type == TaskType.SEQ_CLS:  # PEFT trains (and saves) the classification head too
            config.modules_to_save = list(config.modules_to_save or [])
            config.modules_to_save += [m for m in SEQ_CLS_HEAD_NAMES if m not in config.modules_to_save]
        inject_lora(self.model, config, name, autocast_adapter_dtype)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, name)

    def check_one_bias(self, adapter_name: str, config: LoraConfig) -> None:
        """As PEFT's BaseTuner._check_new_adapter_config: one adapter at most trains base biases (two would
        train, and each save, the same bias tensors)."""
        configs = self.peft_model.peft_config
        other = next((n for n, c in configs.items() if c.bias != "none"), None)
        if config.bias != "none" and other is not None:
            raise ValueError(f"adapter {adapter_name!r} has bias={config.bias!r} but adapter {other!r} trains "
                             f"biases already (bias={configs[other].bias!r}): only one adapter may train "
                             "biases, as in HF PEFT; set bias='none' for one of them")

    def activate(self, name: str) -> None:
        config = self.peft_model.peft_config[name]
        for layer in self.layers():
            layer.active_adapters = [name]
            for held in layer.r if isinstance(layer, LORA_LAYERS) else layer.modules_to_save:  # its adapter names
                for p in layer.adapter_params(held):
                    p.requires_grad_(held == name and not config.inference_mode)
        self.set_bias_trainable(config)

    def make_trainable(self, name: str) -> None:
        for p in self.parameters(name):
            p.requires_grad_(True)
        self.set_bias_trainable(self.peft_model.peft_config[name])

    def set_bias_trainable(self, config: LoraConfig) -> None:
        trainable = not config.inference_mode
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith(".bias") and ".lora_" not in name and "original_module." not in name:
                    p.requires_grad_(trainable)
        elif config.bias == "lora_only":
            for layer in self.model.modules():
                # getattr: an nn.Embedding base has no bias attribute at all
                if isinstance(layer, LORA_LAYERS) and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(trainable)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [p for layer in self.layers() for p in layer.adapter_params(name)]

    def delete(self, name: str) -> None:
        for layer in self.layers():
            layer.delete_adapter(name)

    @contextlib.contextmanager
    def disabled(self):
        """As in PEFT, no adapter trains inside (a step there would move weights that took no part in the
        output); on exit each trains as before. PEFT re-enables all of them on exit, even adapters loaded for
        inference; we restore what was set."""
        if self.is_merged():
            self.unmerge()
        layers = self.layers()
        training = [p for name in self.peft_model.peft_config for p in self.parameters(name) if p.requires_grad]
        for layer in layers:
            layer.disable_adapters = True
        for p in training:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False
            for p in training:
                p.requires_grad_(True)

    def is_merged(self) -> bool:
        return any(layer.merged_adapters for layer in self.layers() if isinstance(layer, LORA_LAYERS))

    def merge(self, names: list[str]) -> None:
        layers = [layer for layer in self.layers() if isinstance(layer, LORA_LAYERS)]
        for layer in layers:  # every layer first: a refusal in the last one must not leave the others merged
            layer.check_mergeable(names)
        for layer in layers:
            layer.merge(names)

    def unmerge(self) -> None:
        for layer in self.layers():
            if isinstance(layer, LORA_LAYERS):
                layer.unmerge()

    def unload(self) -> nn.Module:
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LORA_LAYERS):
                set_submodule(self.model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                set_submodule(self.model, name, module.active_module())
        return self.model

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

    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool) -> None:
        adapter_io.save_adapter(self.peft_model, folder, name, self.peft_model.peft_config[name])

    def load_weights(self, folder: str | Path, name: str) -> None:
        adapter_io.load_adapter_weights(self.peft_model, folder, name, self.peft_model.peft_config[name])


class PromptBackend:
    """Prompt encoders beside the untouched model: they add inputs (embeddings or a prefilled cache), not
    weights, so there is nothing to merge, and mixed-adapter batches do not apply. Encoders are float32
    whatever the base, as PEFT builds them."""

    config_type = PromptLearningConfig
    kind = "prompt-learning"
    is_prompt_learning = True

    def __init__(self, peft_model: PeftModel, model: nn.Module):
        self.peft_model = peft_model
        peft_model.base_model = model
        peft_model.prompt_encoder = nn.ModuleDict()
        self.is_disabled = False

    @property
    def model(self) -> nn.Module:
        return self.peft_model.base_model

    def add(self, name: str, config: PromptLearningConfig, autocast_adapter_dtype: bool, loading: bool) -> None:
        self.peft_model.prompt_encoder[name] = encoder_for(config, self.model, loading)

    def activate(self, name: str) -> None:
        inference = self.peft_model.peft_config[name].inference_mode
        for held, encoder in self.peft_model.prompt_encoder.items():
            encoder.requires_grad_(held == name and not inference)

    def make_trainable(self, name: str) -> None:
        self.peft_model.prompt_encoder[name].requires_grad_(True)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.peft_model.prompt_encoder[name].parameters())

    def delete(self, name: str) -> None:
        del self.peft_model.prompt_encoder[name]

    @contextlib.contextmanager
    def disabled(self):
        """Encoders keep requires_grad inside, as in PEFT."""
        self.is_disabled = True
        try:
            yield
        finally:
            self.is_disabled = False

    def is_merged(self) -> bool:
        return False

    def merge(self, names: list[str]) -> None:
        raise TypeError("prompt methods add inputs, not weights: there is nothing to merge")

    def unmerge(self) -> None:
        pass  # nothing was merged

    def unload(self) -> nn.Module:
        return self.model  # the model was never changed

    def active(self) -> tuple[nn.Module, PromptLearningConfig]:
        name = self.peft_model.active_adapter
        return self.peft_model.prompt_encoder[name], self.peft_model.peft_config[name]

    def forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None):
        check_no_mixed_batch(adapter_names)
        if self.is_disabled:
            return self.model(*args, **kwargs)
        return prompted_forward(self.model, *self.active(), *args, **kwargs)

    def generate(self, input_ids, attention_mask, adapter_names, kwargs: dict) -> torch.Tensor:
        check_no_mixed_batch(adapter_names)
        if self.is_disabled:
            return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **kwargs)
        encoder, config = self.active()
        # The prompt or prefix goes in once, at prefill; generate() extends the caller's mask over it itself.
        prompt = prompt_prefill(encoder, config, input_embeddings(self.model), input_ids)
        return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **prompt, **kwargs)

    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool) -> None:
        adapter_io.save_prompt_adapter(self.peft_model.prompt_encoder[name], folder, name,
                                       self.peft_model.peft_config[name], save_prompt_encoder)

    def load_weights(self, folder: str | Path, name: str) -> None:
        adapter_io.load_prompt_adapter(self.peft_model.prompt_encoder[name], folder)


def check_no_mixed_batch(adapter_names) -> None:
    if adapter_names is not None:
        raise ValueError("adapter_names (mixed batches) is supported for LoRA adapters only")


BACKENDS: tuple[type[AdapterBackend], ...] = (LoraBackend, PromptBackend)


def backend_type(config: PeftConfig) -> type[AdapterBackend]:
    for backend in BACKENDS:
        if isinstance(config, backend.config_type):
            return backend
    kinds = ", ".join(b.config_type.__name__ for b in BACKENDS)
    raise TypeError(f"a PeftModel is made from a {kinds} (or a subclass), not a {type(config).__name__}")


class PeftModel(nn.Module):
    """`autocast_adapter_dtype` (here, in add_adapter, from_pretrained, load_adapter), as in PEFT: LoRA weights
    on a float16 / bfloat16 base are kept in float32 (False: in the base's dtype)."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, _loading: bool = False):
        super().__init__()
        self.backend: AdapterBackend = backend_type(config)(self, model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype, _loading)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.backend.model

    @property
    def is_prompt_learning(self) -> bool:
        return self.backend.is_prompt_learning

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (`config`, `new_cache`, ...) read through, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "backend"):
                raise
            return getattr(self.base_model, name)

    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True,
                    _loading: bool = False) -> None:
        """Inject a new, inactive adapter (the first one, made in __init__, is the active one)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it first")
        if not isinstance(config, self.backend.config_type):
            raise TypeError(f"this PeftModel holds {self.backend.kind} adapters; "
                            f"a {type(config).__name__} needs its own PeftModel")
        config = copy.deepcopy(config)
        self.backend.add(adapter_name, config, autocast_adapter_dtype, _loading)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)  # as in PEFT, a new adapter waits for set_adapter() to run

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one that runs and trains; the others stay loaded and frozen."""
        self.check_known([adapter_name])
        self.active_adapter = adapter_name
        self.backend.activate(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every tensor adapter `adapter_name` trains (LoRA factors, magnitudes, modules_to_save copies, prompts)."""
        return self.backend.parameters(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_known([adapter_name])
        self.backend.delete(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def check_known(self, names, allow_base: bool = False) -> None:
        unknown = sorted({n for n in names if n not in self.peft_config and not (allow_base and n == BASE)})
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; "
                             f"loaded: {', '.join(self.peft_config)}")

    def disable_adapter(self) -> ContextManager:
        """Run the base model alone inside the block (merged adapters are unmerged first, as in PEFT)."""
        return self.backend.disabled()

    # -- merging --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or [self.active_adapter]
        self.check_known(names)
        self.backend.merge(names)

    def unmerge_adapter(self) -> None:
        self.backend.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model.

        A quantized base comes back dense (dequantized, then merged); `self.merge_report` holds,
        per layer, the error re-quantizing the merged weight would add (peftcore.lora.quantized_merge)."""
        from peftcore.lora.quantized_merge import densify, requantization_report

        merged = densify(self.model)
        if not self.backend.is_merged():
            self.merge_adapter()
        model = self.unload()
        self.merge_report = requantization_report(model, merged)
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every adapter layer swapped back for what it wrapped."""
        return self.backend.unload()

    # -- running --------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward, arguments passed through as given (input_ids, attention_mask=...).

        With a prompt method, per-token outputs cover the input tokens only (HF PEFT also returns
        the virtual tokens' positions, which callers then have to cut off)."""
        return self.backend.forward(args, kwargs, adapter_names)

    def generate(self, input_ids, adapter_names=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Decode with the active adapter."""
        return self.backend.generate(input_ids, attention_mask, adapter_names, kwargs)

    def new_cache(self):
        return self.model.new_cache()

    # -- parameters -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts. A quantized linear's weight counts as its out x in
        weights (its packed codes and scales are buffers), as HF PEFT counts a 4-bit weight."""
        from peftcore.models.quantized import QuantLinear

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        quantized = sum(m.out_features * m.in_features for m in self.modules() if isinstance(m, QuantLinear))
        return trainable, sum(p.numel() for p in self.parameters()) + quantized

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, selected_adapters: list[str] | None = None,
                        save_prompt_encoder: bool = False) -> None:
        """HF PEFT's format. `save_prompt_encoder=True` (prompt methods) also writes the encoder's own
        weights, so training can resume from the folder (PEFT keeps only the prompts it produces)."""
        for name in selected_adapters or list(self.peft_config):
            self.backend.save(folder, name, save_prompt_encoder)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder, adapter_name: str = "default", is_trainable: bool = False,
                        autocast_adapter_dtype: bool = True) -> PeftModel:
        peft_model = cls(model, adapter_io.load_config_for(folder, is_trainable), adapter_name, autocast_adapter_dtype,
                         _loading=True)
        peft_model.backend.load_weights(folder, adapter_name)
        return peft_model if is_trainable else peft_model.eval()  # PEFT: loaded for inference, dropout off

    def load_adapter(self, folder, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True) -> None:
        """Load an adapter beside the others; it does not become the active one (PEFT's behaviour), but with
        is_trainable it trains (as in PEFT), the others keeping their requires_grad."""
        self.add_adapter(adapter_name, adapter_io.load_config_for(folder, is_trainable), autocast_adapter_dtype,
                         _loading=True)
        try:
            self.backend.load_weights(folder, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)  # leave no half-loaded adapter behind
            raise
        if is_trainable:  # add_adapter froze it, as every adapter but the active one
            self.backend.make_trainable(adapter_name)
        else:
            self.eval()


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype)

