"""Adapter configs: HF PEFT's field names, defaults and adapter_config.json format.

Readers tolerate keys they do not know (newer PEFT versions add fields): a key that only names a
PEFT feature we do not implement is ignored while it holds PEFT's default, and warned about when it
does not, because then the adapter would behave differently here.
"""
from __future__ import annotations

import enum
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PEFT_FORMAT_VERSION = "0.21.2"  # the HF PEFT release whose format we write and test against
CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


# PEFT fields for features peftcore does not implement, with the value that means "off".
PEFT_FIELDS_OFF = {
    "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False, "tokenizer_kwargs": None, "num_transformer_submodules": None,
}
IGNORED_KEYS = {"peft_version", "auto_mapping"}  # metadata: the class PEFT wrapped, nothing that changes the adapter


@dataclass
class PeftConfig:
    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    peft_type = None  # set by each method's config (a class attribute, not a field)

    def __post_init__(self):
        if isinstance(self.task_type, str):
            if self.task_type not in TaskType.__members__:
                raise ValueError(f"task_type {self.task_type!r} is not supported; supported: {', '.join(TaskType.__members__)}")
            self.task_type = TaskType(self.task_type)

    def to_dict(self) -> dict:
        d = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}
        d = {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
        return {**d, "peft_type": self.peft_type.value, "peft_version": PEFT_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        d = dict(d)
        peft_type = d.pop("peft_type", None)
        if peft_type is not None and peft_type != cls.peft_type.value:
            raise ValueError(f"adapter_config.json is for {peft_type}, not {cls.peft_type.value}")
        names = {f.name for f in fields(cls)}
        warn_unknown(cls.__name__, {k: v for k, v in d.items() if k not in names})
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, folder: str | Path) -> None:
        d = {**self.to_dict(), "inference_mode": True}
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def warn_unknown(where: str, extra: dict) -> None:
    for key, value in extra.items():
        if key in IGNORED_KEYS or (key in PEFT_FIELDS_OFF and value == PEFT_FIELDS_OFF[key]):
            continue
        if key in PEFT_FIELDS_OFF:
            warnings.warn(f"{where}: {key}={value!r} asks for a PEFT feature peftcore does not implement; ignored")
        else:
            warnings.warn(f"{where}: unknown key {key!r} in adapter_config.json ignored (written by a newer PEFT?)")


@dataclass
class LoraConfig(PeftConfig):
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"  # "none" | "all" | "lora_only": which base biases train
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True  # True | False | "gaussian" | "pissa" | "pissa_niter_K" | "olora"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False  # a trainable bias on lora_B

    peft_type = PeftType.LORA

    def __post_init__(self):
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ValueError("layers_to_transform / layers_pattern cannot be used when target_modules is a str (a regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias=True is not supported together with use_dora=True (as in HF PEFT)")


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {PeftType.LORA.value: LoraConfig}
