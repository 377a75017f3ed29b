"""Every LoRA layer class in one tuple: what the backends, the adapter files, merges and weighted combinations
look for when they walk a model. It sits above layer.py (linear, embedding) and conv.py (built on layer.py's
helpers), so naming all three closes no import circle."""
from peftcore.lora.conv import LoraConv
from peftcore.lora.layer import LoraEmbedding, LoraLinear

LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv)
