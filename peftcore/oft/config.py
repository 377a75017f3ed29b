"""OFTConfig: HF PEFT 0.21.2's field names and defaults for Orthogonal Finetuning (Qiu et al. 2023, arXiv:2306.07280).

OFT learns a block-diagonal orthogonal matrix R per adapted layer and feeds the layer x R instead of x, so the
layer computes with W R^T: the angles between the weight's rows (its "hyperspherical energy") are preserved.
Each block of R is the Cayley transform of a skew-symmetric matrix whose upper triangle is the trainable vector.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from peftcore.config import PeftConfig, PeftType

BIAS_CHOICES = ("none", "all", "oft_only")


@dataclass
class OFTConfig(PeftConfig):
    # the rotation's block layout: exactly one of the two is nonzero, the other follows from the layer's width
    # (r * oft_block_size == in_features); a value that does not divide it is moved to the nearest that does
    r: int = 0  # number of blocks per layer
    oft_block_size: int = 32  # side of each block
    # accepted for PEFT's configs, but HF PEFT 0.21.2 builds its dropout layer and never calls it: no effect
    module_dropout: float = 0.0
    # list: a full module name or a name ending; str: a regex matching the whole name; "all-linear": every linear
    # but the output head
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # OFT takes no (in, out)-stored layer; True is reset to False on nn.Linear (PEFT)
    bias: str = "none"  # "none" | "all" | "oft_only": which base biases train
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True  # True: zero vectors (R = I, the adapter starts as the base); False: N(0, 0.1)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False  # constrained OFT: each forward projects the vectors back into a ball of radius ~eps
    eps: float = 6e-5  # COFT's radius (divided by sqrt(number of blocks)); used only with coft=True
    block_share: bool = False  # one block, repeated along the diagonal
    # True: R ~ I + 2S + 2S^2 + ... (a truncated series, no matrix inverse); False: the exact (I - S)(I + S)^-1
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    peft_type = PeftType.OFT

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        check_blocks(self.r, self.oft_block_size)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True (identity start) or False (random), got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform (as in HF PEFT)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            warnings.warn("layers_to_transform is ignored when target_modules is a str (a regex), as in HF PEFT: "
                          "put the layer index into the regex instead")
        check_series(self)


def check_blocks(r: int, oft_block_size: int) -> None:
    """PEFT's rule: exactly one of r / oft_block_size is nonzero, since r * oft_block_size == in_features."""
    if r < 0 or oft_block_size < 0:
        raise ValueError(f"r and oft_block_size must not be negative, got r={r}, oft_block_size={oft_block_size}")
    if r == 0 and oft_block_size == 0:
        raise ValueError("either r or oft_block_size must be nonzero (r * oft_block_size == in_features), got both 0")
    if r != 0 and oft_block_size != 0:
        raise ValueError(f"set only one of r ({r}) and oft_block_size ({oft_block_size}), the other 0: "
                         "r * oft_block_size == in_features, so the layer's width decides the other")


def check_series(config: OFTConfig) -> None:
    """Settings under which every rotation is the identity whatever it learns: an adapter that changes nothing.
    HF PEFT accepts them silently (as it does lora_alpha=0); peftcore refuses, as it does that."""
    if config.use_cayley_neumann and config.num_cayley_neumann_terms < 2:
        raise ValueError(f"num_cayley_neumann_terms={config.num_cayley_neumann_terms} keeps only the series' first "
                         "term, I, so the adapter would change nothing: use 2 or more (PEFT's default is 5)")
    if config.coft and config.eps <= 0:
        raise ValueError(f"eps={config.eps} with coft=True projects every rotation onto the identity: "
                         "use a positive eps (PEFT's default is 6e-5)")
    if not 0 <= config.module_dropout < 1:
        raise ValueError(f"module_dropout must be in [0, 1), got {config.module_dropout}")
    if config.module_dropout > 0:
        warnings.warn(f"module_dropout={config.module_dropout} has no effect: HF PEFT 0.21.2 builds OFT's "
                      "multiplicative dropout but never applies it, and peftcore computes what PEFT computes")
