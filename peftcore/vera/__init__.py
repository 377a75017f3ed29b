"""VeRA (Vector-based Random Matrix Adaptation): per-layer scaling vectors around frozen random projections shared
by the whole model. config: VeraConfig (HF PEFT's fields); layer: VeraLinear, the shared BufferDicts and their
seeded draw; inject: inject_vera, which draws the projections once and wraps the targets."""
from peftcore.vera.config import VeraConfig
from peftcore.vera.inject import inject_vera
from peftcore.vera.layer import BufferDict, VeraLinear, make_projections

__all__ = ["BufferDict", "VeraConfig", "VeraLinear", "inject_vera", "make_projections"]
