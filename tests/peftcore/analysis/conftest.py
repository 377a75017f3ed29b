"""What the analysis tests share: one tiny random Llama checkpoint (transformers-saved), the base their adapters
are made on."""
import pytest
import torch
import transformers

from tests.peftcore.lora.test_vs_peft import LLAMA


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(path)
    return path
