"""triton is an extra ([gpu]; CUDA builds of torch bring it): without it peftcore imports, and QLoRA
and LoRA layers take the torch path."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTriton())
import torch
import peftcore
from peftcore import LoraConfig, get_peft_model
from peftcore.kernels import dispatch
from peftcore.models import LlamaConfig, from_config, quantize_model
assert not dispatch.HAS_TRITON
model = quantize_model(from_config(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2)), "nf4")
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
model(torch.randint(0, 32, (1, 4))).sum().backward()
assert "triton" not in sys.modules
print("ok")
"""


def test_peftcore_imports_and_trains_without_triton():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
