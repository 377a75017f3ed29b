"""Every LoRA layer class in one tuple: what the backends, the adapter files, merges and weighted combinations
look for when they walk a model. It sits above layer.py (linear, embedding), conv.py, mha.py (nn.MultiheadAttention)
and param_wrapper.py (bare nn.Parameters, target_parameters), all built on layer.py's helpers, so naming them all
closes no import circle."""
from peftcore.lora.conv import LoraConv
from peftcore.lora.layer import LoraEmbedding, LoraLinear
from peftcore.lora.mha import LoraMultiheadAttention
from peftcore.lora.param_wrapper import ParamWrapper

LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv, ParamWrapper, LoraMultiheadAttention)
