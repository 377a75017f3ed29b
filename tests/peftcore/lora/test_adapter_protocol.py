"""DESIGN's adapter Protocol: the LoRA layers satisfy it, and what is not an adapter does not."""
import torch
from torch import nn

from peftcore import LoraConfig, get_peft_model
from peftcore.lora.layer import Adapter, LoraEmbedding, LoraLinear
from peftcore.lora.modules_to_save import ModulesToSave
from peftcore.lora.registry import LORA_LAYERS


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(10, 8), nn.Linear(8, 6)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_every_lora_layer_class_is_an_adapter_and_other_modules_are_not():
    assert all(issubclass(cls, Adapter) for cls in LORA_LAYERS)
    assert not issubclass(nn.Linear, Adapter) and not issubclass(ModulesToSave, Adapter)


def test_injected_layers_answer_the_protocol_calls():
    torch.manual_seed(0)
    pm = get_peft_model(Two(), LoraConfig(r=2, target_modules=["emb", "proj"], init_lora_weights=False))
    layers = [m for m in pm.modules() if isinstance(m, Adapter)]
    assert sorted(type(m).__name__ for m in layers) == [LoraEmbedding.__name__, LoraLinear.__name__]
    ids = torch.tensor([[1, 2, 3]])
    before = pm(ids).detach()
    for layer in layers:
        assert [p.shape for p in layer.adapter_params("default")]
        weight = layer.base_layer.weight.detach().clone()
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight.detach(), weight + layer.delta_weight("default").detach())
    torch.testing.assert_close(pm(ids).detach(), before)
    for layer in layers:
        layer.unmerge()
    torch.testing.assert_close(pm(ids).detach(), before)
