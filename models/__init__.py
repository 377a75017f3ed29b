"""Minimal Llama-family / GPT-2 / BERT models that load Hugging Face checkpoints key for key."""
from .cache import KVCache
from .checkpoint import CheckpointError, from_config, load_pretrained, save_pretrained
from .generate import generate
from .layers import Conv1D
from .llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "CheckpointError", "Conv1D", "KVCache", "LlamaConfig", "LlamaForCausalLM",
    "from_config", "generate", "load_pretrained", "save_pretrained",
]
