"""PeftModel: a base model with named adapters, and the adapter lifecycle around it.

Layout and names follow HF PEFT so state dicts and files line up. LoRA: `peft_model.base_model.model`
is the user's model with LoRA layers swapped in (keys `base_model.model.<module path>...`). Prompt
methods: `peft_model.base_model` is the untouched user's model and `peft_model.prompt_encoder[name]`
makes the prompt; one PeftModel holds adapters of one kind, as in PEFT.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from peftcore.models.generate import generate as generate_tokens

from peftcore import adapter_io
from peftcore.config import LoraConfig, PeftConfig, TaskType
from peftcore.lora.inject import SEQ_CLS_HEAD_NAMES, inject_lora, set_submodule
from peftcore.lora.layer import LORA_LAYERS
from peftcore.lora.modules_to_save import ModulesToSave, wrap_modules_to_save
from peftcore.prompt.encoders import (
    PromptLearningConfig, PromptTuningInit, build_encoder, drop_prompt_positions, fill_from_model, input_embeddings,
    prompt_kwargs,
)

BASE = "__base__"  # adapter_names entry for a row that runs the base model only


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


class PeftModel(nn.Module):
    """`autocast_adapter_dtype` (here, in add_adapter, from_pretrained, load_adapter), as in PEFT: LoRA weights
    on a float16 / bfloat16 base are kept in float32 (False: in the base's dtype). Prompt encoders are
    float32 either way, as PEFT builds them."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        prompt_learning = isinstance(config, PromptLearningConfig)
        self.base_model = model if prompt_learning else LoraModel(model)
        if prompt_learning:
            self.prompt_encoder = nn.ModuleDict()
            self.prompt_disabled = False
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.base_model if self.is_prompt_learning else self.base_model.model

    @property
    def is_prompt_learning(self) -> bool:
        return "prompt_encoder" in self._modules

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (`config`, `new_cache`, ...) read through, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def adapter_layers(self):
        return [m for m in self.model.modules() if isinstance(m, (*LORA_LAYERS, ModulesToSave))]

    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Inject a new, inactive adapter (the first one, made in __init__, is the active one)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it first")
        if not isinstance(config, PromptLearningConfig if self.is_prompt_learning else LoraConfig):
            kind = "prompt-learning" if self.is_prompt_learning else "LoRA"
            raise TypeError(f"this PeftModel holds {kind} adapters; a {type(config).__name__} needs its own PeftModel")
        config = copy.deepcopy(config)
        if self.is_prompt_learning:
            self.add_prompt_adapter(adapter_name, config)
            return
        self.check_one_bias(adapter_name, config)
        if config.task_type == TaskType.SEQ_CLS:  # PEFT trains (and saves) the classification head too
            config.modules_to_save = list(config.modules_to_save or [])
            config.modules_to_save += [m for m in SEQ_CLS_HEAD_NAMES if m not in config.modules_to_save]
        inject_lora(self.model, config, adapter_name, autocast_adapter_dtype)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)  # as in PEFT, a new adapter waits for set_adapter() to run

    def check_one_bias(self, adapter_name: str, config: LoraConfig) -> None:
        """As PEFT's BaseTuner._check_new_adapter_config: one adapter at most trains base biases (two would
        train, and each save, the same bias tensors)."""
        other = next((n for n, c in self.peft_config.items() if c.bias != "none"), None)
        if config.bias != "none" and other is not None:
            raise ValueError(f"adapter {adapter_name!r} has bias={config.bias!r} but adapter {other!r} trains "
                             f"biases already (bias={self.peft_config[other].bias!r}): only one adapter may train "
                             "biases, as in HF PEFT; set bias='none' for one of them")

    def add_prompt_adapter(self, adapter_name: str, config: PromptLearningConfig, loading: bool = False) -> None:
        fill_from_model(config, self.model)
        # Loading overwrites the prompts: skip a TEXT / SAMPLE_VOCAB init (and its tokenizer) then.
        build_config = replace(config, prompt_tuning_init=PromptTuningInit.RANDOM) if loading and hasattr(config, "prompt_tuning_init") else config
        device = input_embeddings(self.model).weight.device
        self.prompt_encoder[adapter_name] = build_encoder(build_config, input_embeddings(self.model)).to(device)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one that runs and trains; the others stay loaded and frozen."""
        self.check_known([adapter_name])
        self.active_adapter = adapter_name
        config = self.peft_config[adapter_name]
        if self.is_prompt_learning:
            for name, encoder in self.prompt_encoder.items():
                encoder.requires_grad_(name == adapter_name and not config.inference_mode)
            return
        for layer in self.adapter_layers():
            layer.active_adapters = [adapter_name]
            for name in adapters_of(layer):
                for p in layer.adapter_params(name):
                    p.requires_grad_(name == adapter_name and not config.inference_mode)
        self.set_bias_trainable(config)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every tensor adapter `adapter_name` trains (LoRA factors, magnitudes, modules_to_save copies, prompts)."""
        if self.is_prompt_learning:
            return list(self.prompt_encoder[adapter_name].parameters())
        return [p for layer in self.adapter_layers() for p in layer.adapter_params(adapter_name)]

    def set_bias_trainable(self, config: LoraConfig) -> None:
        trainable = not config.inference_mode
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith(".bias") and ".lora_" not in name and "original_module." not in name:
                    p.requires_grad_(trainable)
        elif config.bias == "lora_only":
            for layer in self.model.modules():
                if isinstance(layer, LORA_LAYERS) and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_known([adapter_name])
        if self.is_prompt_learning:
            del self.prompt_encoder[adapter_name]
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def check_known(self, names, allow_base: bool = False) -> None:
        unknown = sorted({n for n in names if n not in self.peft_config and not (allow_base and n == BASE)})
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; loaded: {', '.join(self.peft_config)}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first, as in PEFT).

        LoRA: as in PEFT, no adapter trains inside (a step there would move weights that took no part in the
        output); on exit each trains as before. PEFT re-enables all of them on exit, even adapters loaded for
        inference; we restore what was set. Prompt encoders keep requires_grad, as in PEFT."""
        if self.is_prompt_learning:
            self.prompt_disabled = True
            try:
                yield
            finally:
                self.prompt_disabled = False
            return
        if any(getattr(layer, "merged_adapters", None) for layer in self.adapter_layers()):
            self.unmerge_adapter()
        layers = self.adapter_layers()
        training = [p for name in self.peft_config for p in self.adapter_parameters(name) if p.requires_grad]
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

    # -- merging --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        if self.is_prompt_learning:
            raise TypeError("prompt methods add inputs, not weights: there is nothing to merge")
        names = adapter_names or [self.active_adapter]
        self.check_known(names)
        layers = [layer for layer in self.adapter_layers() if isinstance(layer, LORA_LAYERS)]
        for layer in layers:  # every layer first: a refusal in the last one must not leave the others merged
            layer.check_mergeable(names)
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            if isinstance(layer, LORA_LAYERS):
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model.

        A quantized base comes back dense (dequantized, then merged); `self.merge_report` holds,
        per layer, the error re-quantizing the merged weight would add (peftcore.lora.quantized_merge)."""
        from peftcore.lora.quantized_merge import densify, requantization_report

        merged = densify(self.model)
        if not any(getattr(layer, "merged_adapters", None) for layer in self.adapter_layers()):
            self.merge_adapter()
        model = self.unload()
        self.merge_report = requantization_report(model, merged)
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every adapter layer swapped back for what it wrapped."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LORA_LAYERS):
                set_submodule(self.model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                set_submodule(self.model, name, module.active_module())
        return self.model

    # -- running --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: list[str] | None):
        """Route row b of the batch through adapter adapter_names[b] in every adapter layer."""
        if adapter_names is None:
            yield
            return
        self.check_known(adapter_names, allow_base=True)
        if self.training:
            raise RuntimeError("adapter_names (a mixed-adapter batch) is for inference; call .eval() first")
        hooks = [
            layer.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "adapter_names": adapter_names}), with_kwargs=True)
            for layer in self.adapter_layers()
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward, arguments passed through as given (input_ids, attention_mask=...).

        With a prompt method, per-token outputs cover the input tokens only (HF PEFT also returns
        the virtual tokens' positions, which callers then have to cut off)."""
        if self.is_prompt_learning and not self.prompt_disabled:
            if adapter_names is not None:
                raise ValueError("adapter_names (mixed batches) is supported for LoRA adapters only")
            return self.prompt_forward(*args, **kwargs)
        with self.batch_adapters(adapter_names):
            return self.base_model(*args, **kwargs)

    def prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        config = self.peft_config[self.active_adapter]
        encoder = self.prompt_encoder[self.active_adapter]
        full = prompt_kwargs(encoder, config, input_embeddings(self.model), input_ids, attention_mask, inputs_embeds, kwargs)
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return drop_prompt_positions(self.model(**full), config, T)

    def generate(self, input_ids, adapter_names=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Decode with the active adapter; a prompt or prefix is put in once, at prefill."""
        if self.is_prompt_learning and not self.prompt_disabled:
            config, encoder = self.peft_config[self.active_adapter], self.prompt_encoder[self.active_adapter]
            with torch.no_grad():
                full = prompt_kwargs(encoder, config, input_embeddings(self.model), input_ids, None, None, {})
            # generate() prepends ones for the prompt / prefix positions to the caller's mask itself
            return generate_tokens(self.model, input_ids, attention_mask=attention_mask,
                                   inputs_embeds=full["inputs_embeds"], cache=full.get("cache"), **kwargs)
        with self.batch_adapters(adapter_names):
            return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **kwargs)

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
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, selected_adapters: list[str] | None = None,
                        save_prompt_encoder: bool = False) -> None:
        """HF PEFT's format. `save_prompt_encoder=True` (prompt methods) also writes the encoder's own
        weights, so training can resume from the folder (PEFT keeps only the prompts it produces)."""
        for name in selected_adapters or list(self.peft_config):
            if self.is_prompt_learning:
                adapter_io.save_prompt_adapter(self.prompt_encoder[name], folder, name, self.peft_config[name], save_prompt_encoder)
            else:
                adapter_io.save_adapter(self, folder, name, self.peft_config[name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder, adapter_name: str = "default", is_trainable: bool = False,
                        autocast_adapter_dtype: bool = True) -> "PeftModel":
        config = prepare_loaded_config(folder, is_trainable)
        if isinstance(config, PromptLearningConfig):
            peft_model = cls(model, replace(config, prompt_tuning_init="RANDOM") if hasattr(config, "prompt_tuning_init") else config, adapter_name)
            peft_model.peft_config[adapter_name] = config
            adapter_io.load_prompt_adapter(peft_model.prompt_encoder[adapter_name], folder)
        else:
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype)
            adapter_io.load_adapter_weights(peft_model, folder, adapter_name, peft_model.peft_config[adapter_name])
        return peft_model if is_trainable else peft_model.eval()  # PEFT: loaded for inference, dropout off

    def load_adapter(self, folder, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True) -> None:
        """Load an adapter beside the others; it does not become the active one (PEFT's behaviour), but with
        is_trainable it trains (as in PEFT), the others keeping their requires_grad."""
        config = prepare_loaded_config(folder, is_trainable)
        if isinstance(config, PromptLearningConfig) and self.is_prompt_learning:
            if adapter_name in self.peft_config:
                raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it first")
            self.add_prompt_adapter(adapter_name, config, loading=True)
        else:
            self.add_adapter(adapter_name, config, autocast_adapter_dtype)
        try:
            if self.is_prompt_learning:
                adapter_io.load_prompt_adapter(self.prompt_encoder[adapter_name], folder)
            else:
                adapter_io.load_adapter_weights(self, folder, adapter_name, self.peft_config[adapter_name])
        except Exception:
            self.delete_adapter(adapter_name)  # leave no half-loaded adapter behind
            raise
        if is_trainable:  # add_adapter froze it, as every adapter but the active one
            for p in self.adapter_parameters(adapter_name):
                p.requires_grad_(True)
            if not self.is_prompt_learning:
                self.set_bias_trainable(config)
        else:
            self.eval()


def prepare_loaded_config(folder, is_trainable: bool) -> PeftConfig:
    """The saved config, set for inference or training. A reparameterised prompt (P-tuning, a prefix
    projection) can only resume training when its encoder weights were saved too."""
    config = adapter_io.load_config(folder)
    reparameterized = getattr(config, "encoder_reparameterization_type", None) is not None or getattr(config, "prefix_projection", False)
    if is_trainable and reparameterized and not adapter_io.has_encoder_weights(folder):
        raise ValueError(
            f"{folder} holds only the prompts this {config.peft_type.value} encoder produced, not the encoder: "
            "resume training from a folder saved with save_pretrained(..., save_prompt_encoder=True)"
        )
    config.inference_mode = not is_trainable
    return config


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype)


def adapters_of(layer: nn.Module):
    """The adapter names a LoRA layer or modules_to_save wrapper holds."""
    return getattr(layer, "r", None) or getattr(layer, "modules_to_save", {})
