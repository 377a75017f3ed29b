"""peftcore: parameter-efficient fine-tuning from scratch in plain PyTorch."""
from peftcore._version import __version__
from peftcore.adalora import AdaLoraConfig
from peftcore.config import LoftQConfig, LoraConfig, PeftConfig, PeftType, TaskType
from peftcore.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peftcore.ia3 import IA3Config
from peftcore.lora.layer import LoraEmbedding, LoraLinear
from peftcore.lora.loftq import replace_lora_weights_loftq
from peftcore.lycoris import LoHaConfig, LoKrConfig
from peftcore.models.quantized import quantize_model  # QLoRA: quantize the base, then get_peft_model
from peftcore.multitask.heads import TaskSpec
from peftcore.multitask.model import MultiTaskModel
from peftcore.oft import OFTConfig
from peftcore.peft_model import PeftModel, get_peft_model
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.vera import VeraConfig

__all__ = ["AdaLoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoftQConfig", "LoraConfig", "LoraEmbedding",
           "LoraLinear", "MultiTaskModel", "OFTConfig", "PeftConfig", "PeftModel", "PeftType", "PrefixTuningConfig",
           "PromptEncoderConfig", "PromptTuningConfig", "TaskSpec", "TaskType", "VeraConfig", "__version__",
           "get_peft_model", "get_peft_model_state_dict", "inject_adapter_in_model", "quantize_model",
           "replace_lora_weights_loftq", "set_peft_model_state_dict"]
