"""AdaLoRA's config (Zhang et al. 2023, arXiv:2303.10512): HF PEFT 0.21.2's AdaLoraConfig, field for field.

AdaLoRA writes each update in SVD form, dW = B diag(E) A * scaling / ranknum, starts every layer at `init_r`
triplets and, while training, zeroes the least important entries of E until the average rank is `target_r`:

    steps [0, tinit]                      warm-up: every triplet kept (the budget is init_r per layer)
    steps (tinit, total_step - tfinal)    the budget falls as a cubic from init_r to target_r per layer; every
                                          deltaT steps the lowest-scoring triplets are masked to meet it
    steps [total_step - tfinal, ...)      the final mask (`rank_pattern`) is fixed and re-applied every step

The schedule runs in peftcore's one training loop (training.hooks); a saved adapter keeps only the triplets
rank_pattern marks, as PEFT's files do. The LoRA fields r, rank_pattern-as-ints, alpha_pattern, use_rslora and
use_dora mean nothing here: PEFT warns about r and refuses DoRA / LoftQ, and so do we.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from peftcore.config import LoraConfig, PeftType


@dataclass
class AdaLoraConfig(LoraConfig):
    target_r: int = 8  # the average rank the budget ends at
    init_r: int = 12  # every layer's rank at the start
    tinit: int = 0  # steps of warm-up before the budget starts to fall
    tfinal: int = 0  # steps of fine-tuning at the final ranks
    deltaT: int = 1  # steps between two budget allocations
    beta1: float = 0.85  # EMA factor of the sensitivity (|p * grad|)
    beta2: float = 0.85  # EMA factor of its uncertainty
    orth_reg_weight: float = 0.5  # weight of ||A A^T - I||_F, ||B^T B - I||_F in the loss
    total_step: int | None = None  # required: the schedule is laid out over it
    rank_pattern: dict | None = None  # {"<module>.lora_E": [bool] * init_r}: the triplets kept (set by training)

    peft_type = PeftType.ADALORA

    def __post_init__(self):
        super().__post_init__()
        if self.use_dora:
            raise ValueError("AdaLoraConfig: use_dora=True is not supported (AdaLoRA has no DoRA form, as in HF PEFT)")
        if getattr(self, "loftq_config", None):
            raise ValueError("AdaLoraConfig: loftq_config is not supported (as in HF PEFT); LoftQ initialises LoRA")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("AdaLoraConfig: layers_to_transform cannot be used when target_modules is a str (a regex)")
        if self.r != 8:  # 8: LoraConfig's default
            warnings.warn("AdaLoraConfig.r is not used by AdaLoRA and is ignored; the initial rank is init_r")
        check_schedule(self)


def check_schedule(config: AdaLoraConfig) -> None:
    """PEFT's checks, plus the ones whose failure PEFT reports later as an assert or an index error."""
    if config.total_step is None or config.total_step <= 0:
        raise ValueError(f"AdaLoraConfig.total_step={config.total_step!r}: AdaLoRA lays its rank schedule over the "
                         "training steps, so give it the number of steps (> 0); `peftcore train` fills it in")
    if config.orth_reg_weight < 0:
        raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {config.orth_reg_weight}")
    if config.tinit >= config.total_step - config.tfinal:
        raise ValueError(f"AdaLoraConfig: tinit={config.tinit} and tfinal={config.tfinal} leave no steps of "
                         f"total_step={config.total_step} for the budget to fall: lower tinit / tfinal or raise "
                         "total_step")
    if not (0 < config.beta1 < 1 and 0 < config.beta2 < 1):
        raise ValueError(f"AdaLoraConfig: beta1={config.beta1}, beta2={config.beta2}: EMA factors must lie in (0, 1)")
    if config.init_r <= 0 or config.target_r <= 0 or config.target_r > config.init_r:
        raise ValueError(f"AdaLoraConfig: need 0 < target_r <= init_r, got target_r={config.target_r}, "
                         f"init_r={config.init_r}")
    if config.deltaT <= 0:
        raise ValueError(f"AdaLoraConfig.deltaT must be a positive number of steps, got {config.deltaT}")
