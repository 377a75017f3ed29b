"""Adapter configs: HF PEFT's field names, defaults and adapter_config.json format.

Readers tolerate keys they do not know (newer PEFT versions add fields) while those keys are off (None,
False, empty, or PEFT's default). A PEFT option we do not implement that is on is refused when it changes what
the adapter computes and warned about when it only shaped the adapter's initialisation; an unknown key
that is on is refused, since we cannot tell which of the two it is.
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
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    OFT = "OFT"
    ADALORA = "ADALORA"


# PEFT 0.21.2 LoraConfig fields peftcore does not implement: (the value that means "off", what the
# option does, from PEFT's LoraConfig docstring). Set to anything else, a REFUSED option changes what the
# adapter computes, or the model it applies to: loaded as plain LoRA it gives other outputs (the reliability
# issue saw them off by 110%), so it is an error.
REFUSED_PEFT_FIELDS = {
    "alora_invocation_tokens": (None, "Activated LoRA (the adapter acts only from its invocation tokens on)"),
    "use_qalora": (False, "QALoRA (lora_A sees the input pooled in groups)"),
    "layer_replication": (None, "layer replication (base layers repeated into a deeper model)"),
    "monteclora_config": (None, "MonteCLoRA (Monte Carlo perturbations of the LoRA weights)"),
    "use_bdlora": (None, "BD-LoRA (block-diagonal lora_A or lora_B)"),
    "arrow_config": (None, "Arrow routing among LoRA experts"),
    "kasa_config": (None, "KaSA (a truncated base SVD and a learned diagonal between A and B)"),
    "velora_config": (None, "VeLoRA (compressed activations in lora_A's backward: other gradients)"),
    "ensure_weight_tying": (False, "one adapter shared by tied embedding and output layers"),
}
# INERT options only shape how PEFT builds the adapter (an initialisation that the loaded weights overwrite, a
# framework peftcore models are not built with): the saved weights compute the same without them. Each
# init config is used by PEFT only with its init_lora_weights scheme ("eva", "corda", ...), and that
# scheme peftcore refuses on its own (lora_init.check_scheme), so a config beside another scheme is inert.
# (loftq_config is a LoraConfig field: LoftQ is implemented, peftcore.lora.loftq.)
INERT_PEFT_FIELDS = {
    "eva_config": (None, "EVA's initialisation"),
    "corda_config": (None, "CorDA's initialisation"), "lora_ga_config": (None, "LoRA-GA's initialisation"),
    "megatron_config": (None, "Megatron parallel layers, which peftcore models do not have"),
    "megatron_core": ("megatron.core", "the Megatron module PEFT imports"),
    "qalora_group_size": (16, "QALoRA's pooling, used only with use_qalora=True"),
    "tokenizer_kwargs": (None, "the tokenizer of a TEXT prompt initialisation"),
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
                raise ValueError(f"task_type {self.task_type!r} is not supported; "
                                 f"supported: {', '.join(TaskType.__members__)}")
            self.task_type = TaskType(self.task_type)

    def to_dict(self) -> dict:
        d = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}
        d = {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
        return {**d, "peft_type": self.peft_type.value, "peft_version": PEFT_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict, source: str = CONFIG_NAME) -> "PeftConfig":
        """`source`: the file `d` was read from, named in errors about its keys."""
        d = dict(d)
        peft_type = d.pop("peft_type", None)
        if peft_type is not None and peft_type != cls.peft_type.value:
            raise ValueError(f"adapter_config.json is for {peft_type}, not {cls.peft_type.value}")
        names = {f.name for f in fields(cls)}
        check_extra_keys(source, {k: v for k, v in d.items() if k not in names})
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, folder: str | Path) -> None:
        d = {**self.to_dict(), "inference_mode": True}
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def is_off(value) -> bool:
    """None, False or empty: how PEFT writes an option that is not in use (its defaults, bar a few)."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def check_extra_keys(source: str, extra: dict) -> None:
    """Keys of a saved config that are not our fields: refused where they may change the math, else ignored."""
    for key, value in extra.items():
        if key in IGNORED_KEYS:
            continue
        if key in REFUSED_PEFT_FIELDS or key in INERT_PEFT_FIELDS:
            off, what = REFUSED_PEFT_FIELDS.get(key) or INERT_PEFT_FIELDS[key]
            if value == off:
                continue
            if key in REFUSED_PEFT_FIELDS:
                raise ValueError(f"{source}: {key}={value!r} asks for {what}, which peftcore does not implement: "
                                 f"the adapter would compute something else here. Load it with HF PEFT, or retrain "
                                 f"without {key}")
            warnings.warn(f"{source}: {key}={value!r} ignored: it configures {what}, not what the saved weights "
                          "compute")
        elif not is_off(value):
            # A newer PEFT's option: we cannot know its default, nor whether it changes the math.
            raise ValueError(f"{source}: unknown key {key}={value!r} (an option of a newer PEFT?): peftcore cannot "
                             f"tell whether it changes what the adapter computes. If it does not, delete the key "
                             f"from {source}; if it does, load the adapter with HF PEFT")


# LoftQ's bits -> the peftcore quantizer it rounds with, as HF PEFT 0.21.2's loftq_init does with bitsandbytes
# (4: NF4 in blocks of 64 without double quantization, Params4bit(compress_statistics=False); 8: int8 per output row,
# Int8Params). PEFT 0.21.2 refuses every other width ("Only nf4 and int8 quantization is supported"): so do we.
LOFTQ_BITS = {4: "nf4", 8: "int8"}


@dataclass
class LoftQConfig:
    """HF PEFT's LoftQConfig: LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...)). Held in the
    LoraConfig as the dict PEFT's adapter_config.json stores ({"loftq_bits": 4, "loftq_iter": 1})."""

    loftq_bits: int = 4  # 4 (NF4) or 8 (int8)
    loftq_iter: int = 1  # alternating quantize / SVD steps


def check_loftq(scheme, loftq_config) -> dict:
    """PEFT's LoraConfig handling of loftq_config, with one-line errors where PEFT fails later (a KeyError, or a
    ValueError when the first layer is built): -> the dict to keep."""
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = asdict(loftq_config)  # PEFT: vars(loftq_config)
    if scheme != "loftq":
        if loftq_config:  # PEFT warns and clears it, so its files hold {} here
            warnings.warn(f"loftq_config={loftq_config!r} ignored: init_lora_weights is {scheme!r}, not 'loftq' "
                          "(as in HF PEFT, which clears it)")
        return {}
    if not isinstance(loftq_config, dict) or not loftq_config:
        raise ValueError(f"init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4, loftq_iter=1) "
                         f"or {{'loftq_bits': 4, 'loftq_iter': 1}}; got {loftq_config!r}")
    known, given = {f.name for f in fields(LoftQConfig)}, set(loftq_config)
    if given != known:
        raise ValueError(f"loftq_config={loftq_config!r}: expected exactly the keys loftq_bits and loftq_iter "
                         f"(missing: {sorted(known - given)}, unknown: {sorted(given - known)})")
    bits, iters = loftq_config["loftq_bits"], loftq_config["loftq_iter"]
    if type(bits) is not int or bits not in LOFTQ_BITS:
        raise ValueError(f"loftq_bits={bits!r}: LoftQ quantizes to 4 bits (NF4, as bitsandbytes) or 8 bits (int8 per "
                         "row), the two widths HF PEFT 0.21.2 supports")
    if type(iters) is not int or iters < 1:
        raise ValueError(f"loftq_iter={iters!r}: LoftQ takes a whole number >= 1 of quantize / SVD steps")
    return dict(loftq_config)


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
    init_lora_weights: bool | str = True  # True | False | "gaussian" | "pissa" | "pissa_niter_K" | "olora" | "loftq"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False  # a trainable bias on lora_B
    target_parameters: list[str] | None = None  # bare nn.Parameters (MoE expert stacks): "experts.gate_up_proj"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # rows of the embedding that train
    loftq_config: dict = field(default_factory=dict)  # init_lora_weights="loftq": {"loftq_bits", "loftq_iter"}

    peft_type = PeftType.LORA

    def __post_init__(self):
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str) and (
                self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ValueError(
                "layers_to_transform / layers_pattern cannot be used when target_modules is a str (a regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        if self.peft_type is PeftType.LORA:  # AdaLoRA scales by r when lora_alpha <= 0 (PEFT's SVDLinear)
            check_alphas(self.lora_alpha, self.alpha_pattern)
        self.loftq_config = check_loftq(self.init_lora_weights, self.loftq_config)
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias=True is not supported together with use_dora=True (as in HF PEFT)")


def check_alphas(lora_alpha: float, alpha_pattern: dict) -> None:
    """A zero alpha scales the update by zero (scaling = alpha / r): an adapter that trains and changes nothing."""
    if lora_alpha == 0:
        raise ValueError("lora_alpha=0 scales every LoRA update by zero (scaling = lora_alpha / r), so the adapter "
                         "would change nothing: set a nonzero lora_alpha (PEFT's default is 8)")
    for key, alpha in alpha_pattern.items():
        if alpha == 0:
            raise ValueError(f"alpha_pattern[{key!r}]={alpha!r} scales those modules' LoRA update by zero: "
                             "give them a nonzero alpha, or leave them out of target_modules")
