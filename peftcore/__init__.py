"""peftcore: parameter-efficient fine-tuning from scratch in plain PyTorch."""
from peftcore.config import LoraConfig, PeftConfig, PeftType, TaskType
from peftcore.lora.layer import LoraEmbedding, LoraLinear
from peftcore.models.quantized import quantize_model  # QLoRA: quantize the base, then get_peft_model
from peftcore.multitask.heads import TaskSpec
from peftcore.multitask.model import MultiTaskModel
from peftcore.peft_model import PeftModel, get_peft_model
from peftcore.prompt.configs import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLinear", "MultiTaskModel", "PeftConfig", "PeftModel", "PeftType",
           "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "TaskSpec", "TaskType", "get_peft_model",
           "quantize_model"]
