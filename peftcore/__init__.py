"""peftcore: parameter-efficient fine-tuning from scratch in plain PyTorch."""
from .config import LoraConfig, PeftConfig, PeftType, TaskType
from .lora import LoraEmbedding, LoraLinear
from .prompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .peft_model import PeftModel, get_peft_model
from .multitask import MultiTaskModel
from .multitask_heads import TaskSpec
from peftcore.models.quantized import quantize_model  # QLoRA: quantize the base, then get_peft_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLinear", "MultiTaskModel", "PeftConfig", "PeftModel", "PeftType",
           "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "TaskSpec", "TaskType", "get_peft_model",
           "quantize_model"]
