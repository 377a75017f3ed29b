"""LoRA / DoRA: the config, the layers (and the Adapter Protocol), initialisation (LoftQ included), injection,
modules_to_save copies, merging onto quantized bases, pruning."""
from peftcore.config import LoftQConfig
from peftcore.lora.loftq import loftq_factors, quantize_base_layers, replace_lora_weights_loftq

__all__ = ["LoftQConfig", "loftq_factors", "quantize_base_layers", "replace_lora_weights_loftq"]
