"""The prompt-learning backend of a PeftModel: prompt encoders beside the untouched model.

They add inputs (embeddings or a prefilled cache), not weights, so there is nothing to merge, mixed-adapter
batches do not apply, and one prompt runs at a time. Encoders are float32 whatever the base, as PEFT builds
them. Here, not in prompt/, because the backend reads and writes adapter files (adapter_io), which sits above.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from peftcore import adapter_io
from peftcore.models.generate import generate as generate_tokens
from peftcore.prompt.configs import PromptLearningConfig
from peftcore.prompt.encoders import encoder_for, input_embeddings, prompt_prefill, prompted_forward


class PromptBackend:
    config_type = PromptLearningConfig
    kind = "prompt-learning"
    is_prompt_learning = True

    def __init__(self, peft_model: nn.Module, model: nn.Module):
        self.peft_model = peft_model
        peft_model.base_model = model
        peft_model.prompt_encoder = nn.ModuleDict()
        self.layers_disabled = False

    @property
    def model(self) -> nn.Module:
        return self.peft_model.base_model

    def add(self, name: str, config: PromptLearningConfig, autocast_adapter_dtype: bool, loading: bool,
            low_cpu_mem_usage: bool = False) -> None:
        """low_cpu_mem_usage changes nothing here: an encoder is a few thousand weights, built in float32."""
        self.peft_model.prompt_encoder[name] = encoder_for(config, self.model, loading)

    def activate(self, names: list[str]) -> None:
        if len(names) != 1:
            raise ValueError(f"prompt methods run one prompt at a time (as in PEFT), not {len(names)}: "
                             f"set_adapter() one of {', '.join(names)}")
        inference = self.peft_model.peft_config[names[0]].inference_mode
        for held, encoder in self.peft_model.prompt_encoder.items():
            encoder.requires_grad_(held == names[0] and not inference)

    def make_trainable(self, name: str) -> None:
        self.peft_model.prompt_encoder[name].requires_grad_(True)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.peft_model.prompt_encoder[name].parameters())

    def delete(self, name: str) -> None:
        del self.peft_model.prompt_encoder[name]

    def is_disabled(self) -> bool:
        return self.layers_disabled

    def disable_layers(self) -> None:
        """Encoders keep requires_grad, as in PEFT."""
        self.layers_disabled = True

    def enable_layers(self) -> None:
        self.layers_disabled = False

    @contextlib.contextmanager
    def disabled(self):
        was_disabled = self.layers_disabled
        self.layers_disabled = True
        try:
            yield
        finally:
            self.layers_disabled = was_disabled

    def is_merged(self) -> bool:
        return False

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        raise TypeError("prompt methods add inputs, not weights: there is nothing to merge")

    def unmerge(self) -> None:
        pass  # nothing was merged

    def unload(self) -> nn.Module:
        return self.model  # the model was never changed

    def active(self) -> tuple[nn.Module, PromptLearningConfig]:
        name = self.peft_model.active_adapters[0]
        return self.peft_model.prompt_encoder[name], self.peft_model.peft_config[name]

    def forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None):
        check_no_mixed_batch(adapter_names)
        if self.layers_disabled:
            return self.model(*args, **kwargs)
        return prompted_forward(self.model, *self.active(), *args, **kwargs)

    def generate(self, input_ids, attention_mask, adapter_names, kwargs: dict) -> torch.Tensor:
        check_no_mixed_batch(adapter_names)
        if self.layers_disabled:
            return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **kwargs)
        encoder, config = self.active()
        # The prompt or prefix goes in once, at prefill; generate() extends the caller's mask over it itself.
        prompt = prompt_prefill(encoder, config, input_embeddings(self.model), input_ids)
        return generate_tokens(self.model, input_ids, attention_mask=attention_mask, **prompt, **kwargs)

    def save(self, folder: str | Path, name: str, save_prompt_encoder: bool, safe_serialization: bool = True,
             save_embedding_layers="auto") -> None:
        """save_embedding_layers: nothing to save (PeftModel refuses True for a prompt adapter)."""
        adapter_io.save_prompt_adapter(self.peft_model.prompt_encoder[name], folder, name,
                                       self.peft_model.peft_config[name], save_prompt_encoder, safe_serialization)

    def load_weights(self, folder: str | Path, name: str, key_mapping: dict[str, str] | None = None,
                     ignore_mismatched_sizes: bool = False) -> None:
        """A prompt's file holds `prompt_embeddings` only, with no module path to rename (PEFT fails there with "An
        error occurred ..."); ignore_mismatched_sizes skips nothing in it, as in PEFT."""
        if key_mapping:
            raise ValueError("key_mapping renames the module paths in a LoRA adapter's keys; a prompt-learning "
                             "adapter's file holds prompt_embeddings only: load it without key_mapping")
        adapter_io.load_prompt_adapter(self.peft_model.prompt_encoder[name], folder)


def check_no_mixed_batch(adapter_names) -> None:
    if adapter_names is not None:
        raise ValueError("adapter_names (mixed batches) is supported for LoRA adapters only")
