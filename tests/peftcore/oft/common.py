"""Shared pieces of the OFT tests: a tiny attention + MLP block with transformers' module names, a tiny Llama, and
the same adapter built by HF PEFT and by peftcore.oft with PEFT's (perturbed) weights copied into ours."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore.oft import OFT_LAYERS, OFTConfig, inject_oft  # noqa: E402

VOCAB, DIM, HIDDEN = 23, 16, 24


class Block(nn.Module):
    """Embedding, one attention head and an MLP: q/k/v_proj (k without bias), up_proj, down_proj."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.q_proj, self.v_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.k_proj = nn.Linear(DIM, DIM, bias=False)
        self.up_proj, self.down_proj = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, input_ids, **_):
        x = self.embed_tokens(input_ids)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        x = x + torch.softmax(q @ k.transpose(-1, -2) / DIM ** 0.5, dim=-1) @ v
        return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


def block(seed: int = 0, dtype=torch.float32) -> Block:
    torch.manual_seed(seed)
    return Block().to(dtype)


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def ids(batch: int = 3, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module, std: float = 0.2, seed: int = 2) -> None:
    """Move every OFT vector off zero (the default init is the identity, which hides wrong wiring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".oft_R." in name or ".oft_embedding_R." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def pair(base: nn.Module, autocast: bool = True, **kwargs):
    """(PEFT's PeftModel, ours) for the same OFT config on copies of `base`, PEFT's weights perturbed and loaded into
    ours with load_state_dict(strict=True): the state-dict keys are equal or this raises."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kwargs), autocast_adapter_dtype=autocast)
    perturb(theirs)
    ours = copy.deepcopy(base)
    inject_oft(ours, OFTConfig(**kwargs), "default", autocast_adapter_dtype=autocast)
    ours.load_state_dict(theirs.base_model.model.state_dict())
    return theirs, ours


def oft_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, OFT_LAYERS)}


def peft_layers(model: nn.Module) -> dict:
    from peft.tuners.oft.layer import OFTLayer
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, OFTLayer)}


def merge_all(model: nn.Module, names=None) -> None:
    for layer in oft_layers(model).values():
        layer.merge(names)


def unmerge_all(model: nn.Module) -> None:
    for layer in oft_layers(model).values():
        layer.unmerge()
