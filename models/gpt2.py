"""GPT-2: learned positions, pre-LayerNorm blocks, Conv1D projections stored (in, out), tied lm_head.

Module names follow transformers (`transformer.h.0.attn.c_attn`, ...) so checkpoints load key for
key and LoRA `target_modules` mean what they mean in HF PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, build_attention_mask
from .cache import KVCache
from .layers import Conv1D

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

# transformers' GPT2Config.attribute_map: a config.json may use the generic names.
HF_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}

# Buffers of the original checkpoints (a causal triangle and -1e4): our masks replace them.
LEGACY_BUFFERS = ("bias", "masked_bias")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back on save

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        if self.add_cross_attention:
            raise ValueError("add_cross_attention=True (GPT-2 as an encoder-decoder's decoder) is not supported")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        d = {HF_ALIASES.get(k, k): v for k, v in d.items()}
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_hf(self) -> dict:
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}
        d["architectures"] = ["GPT2LMHeadModel"]
        return d


def attention_q_scale(config: GPT2Config, layer_idx: int) -> float:
    """Factor on q that turns SDPA's built-in 1/sqrt(head_dim) into GPT-2's configured scaling."""
    scale = 1.0 if config.scale_attn_weights else math.sqrt(config.head_dim)
    if config.scale_attn_by_inverse_layer_idx:  # Stanford CRFM's trick for stable fp16 training of deep stacks
        scale /= layer_idx + 1
    return scale


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.embed_dim = config.n_head, config.head_dim, config.n_embd
        self.q_scale = attention_q_scale(config, layer_idx)
        self.upcast = config.reorder_and_upcast_attn
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)

    def forward(self, x, mask, past_k=None, past_v=None):
        q, k, v = (self.split_heads(t) for t in self.c_attn(x).split(self.embed_dim, dim=2))
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, n_head, S, head_dim)
        if self.q_scale != 1.0:  # skipped when 1 so the default path is bit-for-bit SDPA's
            q = q * self.q_scale
        if self.upcast:  # fp32 scores/softmax under fp16/bf16 weights, as the flag promises
            out = attend(q.float(), k.float(), v.float(), mask, causal=True).to(x.dtype)
        else:
            out = attend(q, k, v, mask, causal=True)  # (B, T, n_embd)
        return self.resid_dropout(self.c_proj(out)), k, v


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.inner_dim, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.inner_dim)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask, past_k=None, past_v=None):
        attn_out, k, v = self.attn(self.ln_1(x), mask, past_k, past_v)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x)), k, v


class GPT2Model(nn.Module):
    """Token ids (or embeddings) + learned positions -> final normed hidden states (B, T, n_embd)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None):
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, n_embd)
        B, T, _ = x.shape
        past_len = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None].expand(B, T)
        x = self.drop(x + self.wpe(position_ids))
        mask = build_attention_mask(attention_mask, T, past_len, True, x.device)
        for i, block in enumerate(self.h):
            past_k, past_v = cache.layer(i) if cache is not None else (None, None)
            if self.gradient_checkpointing and self.training:
                x, k, v = checkpoint(block, x, mask, past_k, past_v, use_reentrant=False)
            else:
                x, k, v = block(x, mask, past_k, past_v)
            if cache is not None:
                cache.store(i, k, v)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    config_class = GPT2Config
    computes_causal_lm_loss = False  # forward takes no labels: the loop takes the logits (llama.computes_own_loss)

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (nn.Linear, Conv1D)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            # GPT-2 paper: residual-path projections scaled by 1/sqrt(2 * n_layer) (two per block).
            nn.init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_buffers(self):
        """No non-persistent buffers: positions are a learned table, masks are built per call."""

    def checkpoint_key(self, key: str) -> str | None:
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in LEGACY_BUFFERS:
            return None
        if key == "lm_head.weight":
            return None if self.config.tie_word_embeddings else key
        # The original OpenAI-converted checkpoints (and GPT2Model saves) have no `transformer.` prefix.
        return key if key.startswith("transformer.") else f"transformer.{key}"

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None):
        """-> logits (B, T, vocab). position_ids default to past_len + arange(T), as in transformers."""
        hidden = self.transformer(input_ids, attention_mask, position_ids, inputs_embeds, cache)
        return self.lm_head(hidden)
