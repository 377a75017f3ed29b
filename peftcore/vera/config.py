"""VeRA's config (Kopiczko et al. 2023, arXiv:2310.11454): HF PEFT 0.21.2's VeraConfig, field for field.

VeRA freezes one pair of random projections shared by every adapted layer (vera_A (r, in), vera_B (out, r),
drawn from `projection_prng_key`) and trains two vectors per layer: y = base(x) + lambda_b * (B (lambda_d * (A x))).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from peftcore.config import PeftConfig, PeftType

VERA_BIAS_OPTIONS = ("none", "all", "vera_only")


@dataclass
class VeraConfig(PeftConfig):
    r: int = 256  # rows of the shared vera_A; cheap (only lambda_d has r entries), so larger than LoRA's ranks
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0  # seeds the torch.Generator that draws vera_A / vera_B
    save_projection: bool = True  # vera_A / vera_B in the state dict (else: regenerated from the key on load)
    vera_dropout: float = 0.0
    d_initial: float = 0.1  # lambda_d's initial value (lambda_b starts at 0, so a new adapter is the identity)
    fan_in_fan_out: bool = False  # the base stores (in, out), as GPT-2's Conv1D; follows the layer when injecting
    bias: str = "none"  # "none" | "all" | "vera_only": which base biases train
    modules_to_save: list[str] | None = None
    init_weights: bool = True  # False: lambda_b ones and lambda_d ~ N(0, 1) (PEFT's test-only init)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    peft_type = PeftType.VERA

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"VeraConfig.r must be a positive integer (the rows of the shared vera_A), got {self.r!r}")
        if self.bias not in VERA_BIAS_OPTIONS:
            raise ValueError(f"VeraConfig.bias must be one of {', '.join(map(repr, VERA_BIAS_OPTIONS))}, "
                             f"got {self.bias!r}")
        if not 0.0 <= self.vera_dropout <= 1.0:
            raise ValueError(f"VeraConfig.vera_dropout is a probability in [0, 1], got {self.vera_dropout!r}")
        if isinstance(self.target_modules, (set, tuple)):  # PEFT keeps a set; a sorted list writes to JSON
            self.target_modules = sorted(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("VeraConfig.layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # PEFT's matching skips the layer filter for a regex target; say so rather than drop it silently
            warnings.warn("layers_to_transform is ignored when target_modules is a str (a regex), as in HF PEFT: "
                          "put the layer indices into the regex instead")
        if not self.save_projection:
            warnings.warn("save_projection=False: vera_A / vera_B are left out of the state dict and rebuilt from "
                          "projection_prng_key on load, which relies on torch's generator giving the same numbers "
                          "on every system; save_projection=True stores them (as PEFT warns too)")
