"""Shared builders for the (IA)^3 tests: tiny models, the PEFT twin of an injected copy, adapter_names routing."""
import contextlib
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the Hub

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from peftcore.ia3 import IA3_LAYERS, IA3Config, inject_ia3  # noqa: E402

PREFIX = "base_model.model."


class Block(nn.Module):
    """Attention-like mixing and an MLP, with transformers' module names; k_proj has no bias."""

    def __init__(self, d: int = 8, h: int = 12):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        a = self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(a))) + a


class TinyMLP(nn.Module):
    def __init__(self, d: int = 8, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


class TinyConv(nn.Module):
    """conv_in (plain), conv_mid (grouped: its input vector spreads over each group's rows), conv_out (no bias)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_mid = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv_out = nn.Conv2d(6, 2, 1, bias=False)

    def forward(self, x):
        return self.conv_out(torch.relu(self.conv_mid(torch.relu(self.conv_in(x)))))


def tiny_mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype)


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every (IA)^3 vector off its init, so a vector loaded wrongly (or not at all) changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{name}".rsplit(".", 2)[-2] == "ia3_l":  # "<module>.ia3_l.<adapter>", or a bare layer's own
                p.add_((0.3 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def twins(model: nn.Module, autocast: bool = True, **config):
    """(PEFT's model, ours, our layers): the same IA3Config in both; ours holds PEFT's (perturbed) state, loaded
    strictly, which fails unless the state-dict keys are equal key for key."""
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**copy.deepcopy(config)),
                                 autocast_adapter_dtype=autocast)
    perturb(theirs)
    ours = copy.deepcopy(model)
    layers = inject_ia3(ours, IA3Config(**copy.deepcopy(config)), "default", autocast_adapter_dtype=autocast)
    ours.load_state_dict(our_keys(theirs.state_dict()), strict=True)
    return theirs, ours, layers


def our_keys(state: dict) -> dict:
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def ia3_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3_LAYERS)}


def set_active(model: nn.Module, names: list[str]) -> None:
    for layer in ia3_layers(model).values():
        layer.active_adapters = list(names)


@contextlib.contextmanager
def routed(model: nn.Module, adapter_names: list[str]):
    """Every (IA)^3 layer of `model` is called with adapter_names=... (what the backend's hook will pass)."""
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "adapter_names": adapter_names}),
                                             with_kwargs=True) for layer in ia3_layers(model).values()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
