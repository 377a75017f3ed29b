"""(IA)^3 (Liu et al. 2022): the config, the layers (one learned scaling vector per adapted layer) and injection."""
from peftcore.ia3.config import IA3Config
from peftcore.ia3.inject import inject_ia3
from peftcore.ia3.layer import IA3_LAYERS, IA3Conv, IA3Linear

__all__ = ["IA3Config", "IA3Conv", "IA3Linear", "IA3_LAYERS", "inject_ia3"]
