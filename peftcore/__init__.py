"""peftcore: parameter-efficient fine-tuning from scratch in plain PyTorch."""
from peftcore._version import __version__
from peftcore.config import LoraConfig, PeftConfig, PeftType, TaskType
from peftcore.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peftcore.lora.layer import LoraEmbedding, LoraLinear
from peftcore.models.quantized import quantize_model  # QLoRA: quantize the base, then get_peft_model
from peftcore.multitask.heads import TaskSpec
from peftcore.multitask.model import MultiTaskModel
from peftcore.peft_model import PeftModel, get_peft_model
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLinear", "MultiTaskModel", "PeftConfig", "PeftModel", "PeftType",
           "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "TaskSpec", "TaskType", "__version__",
           "get_peft_model", "get_peft_model_state_dict", "inject_adapter_in_model", "quantize_model",
           "set_peft_model_state_dict"]
