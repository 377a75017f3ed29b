"""LoHaConfig and LoKrConfig: HF PEFT 0.21.2's LyCORIS configs, field for field (names and defaults).

Both are flat (no shared base besides PeftConfig): the two field lists differ only in LoKr's Kronecker options,
and a reader of one class sees every option it has. The checks PEFT makes (r > 0, layers_pattern needs
layers_to_transform) raise here at construction, not when the first layer is built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peftcore.config import PeftConfig, PeftType


@dataclass
class LoHaConfig(PeftConfig):
    """LoHa: delta W = (w1_a w1_b) * (w2_a w2_b) * alpha / r, an elementwise (Hadamard) product of two rank-r
    products, so its rank can reach r^2 with the parameters of two rank-r LoRAs (FedPara, arXiv 2108.06098)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0  # training only: each output row of delta W is dropped with this probability
    module_dropout: float = 0.0  # training only: the whole adapter is skipped with this probability per call
    use_effective_conv2d: bool = False  # Conv1d / Conv2d with kernel > 1: CP-decomposed kernel (hada_t1, hada_t2)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True  # True: hada_w2_b = 0 (the adapter starts as the identity); False: all random
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    peft_type = PeftType.LOHA

    def __post_init__(self):
        super().__post_init__()
        check_lycoris_fields(self)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig.init_weights must be True (hada_w2_b starts at zero) or False (all "
                             f"random), got {self.init_weights!r}")


@dataclass
class LoKrConfig(PeftConfig):
    """LoKr: delta W = kron(w1, w2) * alpha / r, w1 (a, c) and w2 (b, d) with a*b = out, c*d = in chosen by
    `factorization`; w2 (and, with decompose_both, w1) is a rank-r product when r is small against its sides."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # Conv1d / Conv2d with kernel > 1: w2 as a CP decomposition (lokr_t2)
    decompose_both: bool = False  # w1 as lokr_w1_a @ lokr_w1_b too, when r < max(w1's sides) / 2
    decompose_factor: int = -1  # -1: the factor pair nearest the square root; f > 0: a side as close to f as can be
    rank_dropout_scale: bool = False  # rescale the kept rows by 1 / (kept fraction), as inverted dropout does
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True  # True: w1 (or w1_a) = 0; False: all random; "lycoris": w2 (or w2_b) = 0
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    peft_type = PeftType.LOKR

    def __post_init__(self):
        super().__post_init__()
        check_lycoris_fields(self)
        if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")


def check_lycoris_fields(config) -> None:
    """The checks both configs share; normalises sets of module names to sorted lists (JSON-writable)."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, (set, tuple)):
            setattr(config, name, sorted(value))
    kind = type(config).__name__
    for key, r in {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items()}}.items():
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"{kind}.{key} must be a positive integer (the rank), got {r!r}")
    for key, alpha in {"alpha": config.alpha, **{f"alpha_pattern[{k!r}]": v
                                                 for k, v in config.alpha_pattern.items()}}.items():
        if alpha == 0:
            raise ValueError(f"{kind}.{key}=0 scales the update by zero (scaling = alpha / r), so the adapter would "
                             "change nothing: set a nonzero alpha (PEFT's default is 8)")
    for name in ("rank_dropout", "module_dropout"):
        p = getattr(config, name)
        if not 0 <= p <= 1:
            raise ValueError(f"{kind}.{name} is a probability and must lie in [0, 1], got {p!r}")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{kind}: layers_pattern only applies together with layers_to_transform (as in HF PEFT)")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        warnings.warn(f"{kind}: layers_to_transform is ignored when target_modules is a regex str (as in HF PEFT): "
                      "the regex alone decides; use a list of names to filter by layer")
