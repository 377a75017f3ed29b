"""Shared by the LoHa / LoKr tests: tiny models, and one adapter built by HF PEFT and copied into ours.

`pair` wraps two copies of a model, one with peft.get_peft_model, one with our inject_*; PEFT's adapter
tensors are then perturbed (a zero init would hide a factor loaded into the wrong place) and PEFT's whole state
dict is loaded into ours with strict=True, which only succeeds if the keys are equal key for key.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore.lycoris import LoHaConfig, LoKrConfig, inject_loha, inject_lokr  # noqa: E402

PREFIX = "base_model.model."
METHODS = {  # name -> (PEFT config class, our config class, our inject)
    "loha": (peft.LoHaConfig, LoHaConfig, inject_loha),
    "lokr": (peft.LoKrConfig, LoKrConfig, inject_lokr),
}
ADAPTER_PREFIXES = ("hada_", "lokr_")


class Block(nn.Module):
    """An attention-like block plus an MLP, with transformers' module names, odd sizes (12 = 3*4, 10 = 2*5 and a
    prime 7, so LoKr's factorization meets uneven and trivial splits), and a bias-free down_proj."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, 10), nn.Linear(dim, 7)
        self.up_proj = nn.Linear(dim + 17, 24)
        self.down_proj = nn.Linear(24, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)  # (..., 29)
        return self.down_proj(torch.relu(self.up_proj(h)))


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def block() -> nn.Module:
    torch.manual_seed(0)
    return Block().eval()


def perturb(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))


def peft_adapter_params(peft_model: nn.Module):
    return [p for n, p in peft_model.named_parameters() if any(k in n for k in ADAPTER_PREFIXES)]


def ours_state(peft_model: nn.Module) -> dict:
    """PEFT's state dict with its `base_model.model.` prefix taken off: the keys our wrapped model must have."""
    return {k.removeprefix(PREFIX): v for k, v in peft_model.state_dict().items()}


def pair(method: str, model: nn.Module, perturbed: bool = True, **kwargs):
    """(PEFT's model, ours, our wrapped layers) for the same config kwargs, our state copied from PEFT's."""
    peft_cls, our_cls, inject = METHODS[method]
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cls(**kwargs)).eval()
    if perturbed:
        perturb(peft_adapter_params(theirs))
    ours = copy.deepcopy(model)
    layers = inject(ours, our_cls(**kwargs), "default")
    ours.load_state_dict(ours_state(theirs), strict=True)
    return theirs, ours.eval(), layers


def peft_layers(peft_model: nn.Module) -> dict:
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, LycorisLayer)}


def tokens(batch: int = 3, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 53, (batch, length), generator=torch.Generator().manual_seed(1))


def features(batch: int = 4, dim: int = 12, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
