"""Prompt tuning, P-tuning and prefix tuning configs: HF PEFT's field names and defaults, and the sizes
filled in from the model they are applied to."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from peftcore.config import PeftConfig, PeftType


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptLearningConfig(PeftConfig):
    num_virtual_tokens: int | None = None
    token_dim: int | None = None  # filled from the model: hidden size (prefix: kv_heads * head_dim)
    num_transformer_submodules: int | None = None  # 1 for the decoder-only and encoder models here
    num_attention_heads: int | None = None  # prefix tuning: the model's KV heads
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.num_virtual_tokens is None or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # a folder with tokenizer.json (peftcore.models.load_tokenizer)

    peft_type = PeftType.PROMPT_TUNING

    def __post_init__(self):
        super().__post_init__()
        self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a folder with tokenizer.json)")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None  # None: token_dim
    encoder_num_layers: int = 2  # LSTM layers; the MLP always has PEFT's fixed three linears
    encoder_dropout: float = 0.0

    peft_type = PeftType.P_TUNING

    def __post_init__(self):
        super().__post_init__()
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(self.encoder_reparameterization_type)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    encoder_hidden_size: int | None = None  # None: token_dim
    prefix_projection: bool = False
    init_weights: str | None = None  # "zero": the prefix starts as zero keys and values

    peft_type = PeftType.PREFIX_TUNING


PROMPT_CONFIGS = (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig)


def model_dims(model: nn.Module) -> dict:
    """hidden, layers, heads, kv_heads, head_dim of a peftcore (or transformers-like) model's config."""
    c = model.config

    def get(*names):
        return next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)

    hidden, heads = get("hidden_size", "n_embd"), get("num_attention_heads", "n_head")
    dims = dict(hidden=hidden, layers=get("num_hidden_layers", "n_layer"), heads=heads)
    dims["kv_heads"] = get("num_key_value_heads") or heads
    dims["head_dim"] = get("head_dim") or hidden // heads
    return dims


def fill_from_model(config: PromptLearningConfig, model: nn.Module) -> None:
    """PEFT's _prepare_prompt_learning_config: sizes the user left out come from the model; sizes a
    saved config carries must fit the model (an adapter for another width is a clear error)."""
    d = model_dims(model)
    prefix = isinstance(config, PrefixTuningConfig)  # keys/values are sized to the KV heads (GQA)
    expected = {
        "num_layers": d["layers"],
        "token_dim": d["kv_heads"] * d["head_dim"] if prefix else d["hidden"],
        "num_attention_heads": d["kv_heads"] if prefix else d["heads"],
    }
    for name, value in expected.items():
        given = getattr(config, name)
        if given is not None and given != value and (name != "num_attention_heads" or prefix):
            raise ValueError(f"the adapter's {name} is {given} but this {type(model).__name__} needs {value} "
                             "(an adapter made for a model of another size?)")
        setattr(config, name, given or value)
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
