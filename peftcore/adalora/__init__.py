"""AdaLoRA (Zhang et al. 2023): SVD-form LoRA layers whose ranks a budget schedule prunes while training.
config: AdaLoraConfig (HF PEFT's fields); layer: AdaLoraLinear / AdaLoraConv2d; inject: inject_adalora;
allocator: RankAllocator (importance scores, the budget schedule, the masks), the orthogonality penalty, and the
rank_pattern resizes of saved files."""
from peftcore.adalora.allocator import (
    RankAllocator,
    check_one_trainable,
    orthogonal_regularization,
    ranks,
    resize_for_load,
    resized_for_file,
)
from peftcore.adalora.config import AdaLoraConfig
from peftcore.adalora.inject import inject_adalora
from peftcore.adalora.layer import ADALORA_LAYERS, AdaLoraConv2d, AdaLoraLinear

__all__ = ["ADALORA_LAYERS", "AdaLoraConfig", "AdaLoraConv2d", "AdaLoraLinear", "RankAllocator",
           "check_one_trainable", "inject_adalora", "orthogonal_regularization", "ranks", "resize_for_load",
           "resized_for_file"]
