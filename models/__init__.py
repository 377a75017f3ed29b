"""Minimal Llama-family / GPT-2 / BERT models that load Hugging Face checkpoints key for key."""
from .bert import BertConfig, BertForSequenceClassification, BertModel, mean_pool
from .cache import KVCache
from .checkpoint import CheckpointError, from_config, load_pretrained, save_pretrained
from .generate import SamplingConfig, SamplingOptions, generate
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .layers import Conv1D
from .llama import LlamaConfig, LlamaForCausalLM
from .quantized import QuantLinear, quantize_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BertConfig", "BertForSequenceClassification", "BertModel", "CheckpointError", "Conv1D", "GPT2Config",
    "GPT2LMHeadModel", "KVCache", "LlamaConfig", "LlamaForCausalLM", "QuantLinear", "SamplingConfig", "SamplingOptions",
    "Tokenizer",
    "from_config", "generate", "load_pretrained", "load_tokenizer", "mean_pool", "quantize_model", "save_pretrained",
]
