"""The supported architectures: transformers' class name -> our model class.

`DEFAULT_ARCHITECTURE` picks a class for a config.json that names no (known) architecture.
"""
from __future__ import annotations

from .llama import LlamaForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    # gpt2: registered below
    # bert: registered below
}

DEFAULT_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# --- gpt2 family ---
# --- bert family ---
