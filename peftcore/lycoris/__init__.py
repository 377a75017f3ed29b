"""LyCORIS adapters, HF PEFT-compatible: LoHa (Hadamard product of two low-rank products) and LoKr (Kronecker
product of two small factors) -- the configs, the layers around nn.Linear / Conv1d / Conv2d, and injection."""
from peftcore.lycoris.config import LoHaConfig, LoKrConfig
from peftcore.lycoris.inject import LYCORIS_LAYERS, inject_loha, inject_lokr
from peftcore.lycoris.loha import LoHaLayer
from peftcore.lycoris.lokr import LoKrLayer, factorization

__all__ = ["LYCORIS_LAYERS", "LoHaConfig", "LoHaLayer", "LoKrConfig", "LoKrLayer", "factorization", "inject_loha",
           "inject_lokr"]
