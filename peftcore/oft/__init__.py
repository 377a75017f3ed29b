"""OFT, Orthogonal Finetuning (Qiu et al. 2023): the config, the layers (a learned block-diagonal rotation of each
adapted layer's input) and injection."""
from peftcore.oft.config import OFTConfig
from peftcore.oft.inject import inject_oft
from peftcore.oft.layer import OFT_LAYERS, OftEmbedding, OftLinear, OftRotation, block_angles, rotation_angle

__all__ = ["OFTConfig", "OFT_LAYERS", "OftEmbedding", "OftLinear", "OftRotation", "block_angles", "inject_oft",
           "rotation_angle"]
