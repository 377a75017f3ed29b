"""The supported architectures: transformers' class name -> our model class.

`DEFAULT_ARCHITECTURE` picks a class for a config.json that names no (known) architecture.
"""
from __future__ import annotations

from .bert import BertForSequenceClassification, BertModel
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
}

DEFAULT_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}
