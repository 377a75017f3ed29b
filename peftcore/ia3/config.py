"""IA3Config: HF PEFT 0.21.2's field names and defaults for (IA)^3 (Liu et al. 2022, arXiv:2205.05638).

(IA)^3 learns one vector per adapted layer: it scales the layer's output features, or, for the modules
named in `feedforward_modules`, its input features (the paper rescales the FFN's hidden activations,
which are the input of the second FFN projection).
"""
from __future__ import annotations

from dataclasses import dataclass

from peftcore.config import PeftConfig, PeftType


@dataclass
class IA3Config(PeftConfig):
    # list: a full module name or a name ending ("q_proj" matches "model.layers.0.self_attn.q_proj");
    # str: a regex that must match the whole name; "all-linear": every linear but the output head;
    # None: PEFT's defaults for the model's model_type (ia3.inject.DEFAULT_TARGETS)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    # the targets whose vector scales the input, not the output; must be a subset of target_modules.
    # list entries match a name ending WITHOUT the "." boundary (PEFT's `key.endswith(entry)`), str: fullmatch
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # weights stored (in, out), GPT-2's Conv1D; set from the layer when injecting
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True  # True: ones (the adapter starts as the identity); False: N(0, 1)

    peft_type = PeftType.IA3

    def __post_init__(self):
        super().__post_init__()
        check_feedforward_subset(self.target_modules, self.feedforward_modules)


def check_feedforward_subset(target_modules, feedforward_modules) -> None:
    """PEFT's rule, checked only when both are lists (a regex cannot be compared): a feedforward module that is no
    target would never be adapted, which is almost certainly a typo."""
    if not isinstance(target_modules, (list, set, tuple)) or not isinstance(feedforward_modules, (list, set, tuple)):
        return
    extra = sorted(set(feedforward_modules) - set(target_modules))
    if extra:
        raise ValueError(f"feedforward_modules must be a subset of target_modules (as in HF PEFT); not in "
                         f"target_modules={sorted(target_modules)}: {extra}")
