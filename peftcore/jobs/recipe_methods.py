"""The adapter methods a recipe's [adapter] method names, and the defaults a recipe starts each from.

LoRA's are the practitioners' starting point (r=8, alpha=32, dropout 0.05); target_modules left unset means the
family's attention query / value projections (q_proj / v_proj, BERT query / value, GPT-2 c_attn), filled in by
jobs.bases for every weight method. The others start from HF PEFT's own defaults, but for a rank or scale a small
model needs (VeRA's r=256 default is larger than the tiny models' widths).
"""
from peftcore.adalora import AdaLoraConfig
from peftcore.config import LoraConfig
from peftcore.ia3 import IA3Config
from peftcore.lycoris import LoHaConfig, LoKrConfig
from peftcore.oft import OFTConfig
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.vera import VeraConfig

METHODS = {"lora": LoraConfig, "dora": LoraConfig, "adalora": AdaLoraConfig, "ia3": IA3Config, "loha": LoHaConfig,
           "lokr": LoKrConfig, "oft": OFTConfig, "vera": VeraConfig, "prompt": PromptTuningConfig,
           "p-tuning": PromptEncoderConfig, "prefix": PrefixTuningConfig}
# adapt weights: target_modules apply
WEIGHT_METHODS = ("lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "vera")
# Fields the job fills in from the model, the task and the base: never set in a recipe.
INTERNAL_ADAPTER_FIELDS = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "token_dim",
                           "num_transformer_submodules", "num_attention_heads", "num_layers", "use_dora"}
ADAPTER_DEFAULTS = {
    "lora": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05},
    "dora": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05},
    # AdaLoRA: scaling is lora_alpha / init_r (alpha / ranknum), LoRA's 32 / 8 = 4 -> 32 / 12 here; total_step is
    # the run's step count (jobs.train fills it in)
    "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 32, "lora_dropout": 0.05},
    "ia3": {"feedforward_modules": []},  # q / v targets are attention outputs: none is a feedforward input
    "loha": {"r": 8, "alpha": 8},
    "lokr": {"r": 8, "alpha": 8},
    "oft": {"r": 0, "oft_block_size": 16},
    "vera": {"r": 16},
    "prompt": {"num_virtual_tokens": 20},
    "p-tuning": {"num_virtual_tokens": 20},
    "prefix": {"num_virtual_tokens": 20},
}
