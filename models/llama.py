"""Llama-family decoders: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2 (q/k/v bias).

Module names follow transformers (`model.layers.0.self_attn.q_proj`, ...) so checkpoints load key
for key and LoRA `target_modules` mean what they mean in HF PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, build_attention_mask
from .cache import KVCache
from .fused import IGNORE_INDEX, causal_lm_loss, rope, silu_mul
from .layers import RMSNorm

HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    attention_bias: bool = False  # Qwen2: q/k/v carry a bias, o_proj does not
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back on save

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama-family models use 'silu')")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.get("rope_scaling") or {}
        if "rope_theta" in rope:  # transformers 5 keeps theta inside rope_parameters
            d.setdefault("rope_theta", rope["rope_theta"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
        d["rope_scaling"] = {**rope, "rope_type": rope_type} if rope_type == "llama3" else None
        model_type = d.get("model_type", "llama")
        if model_type == "qwen2":
            d["attention_bias"] = True
            if d.get("use_sliding_window"):
                raise ValueError("Qwen2 use_sliding_window=True is not supported")
            d["sliding_window"] = None
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_hf(self) -> dict:
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}
        rope = d["rope_scaling"] or {"rope_type": "default"}
        d["rope_parameters"] = {**rope, "rope_theta": d["rope_theta"]}
        # rope_theta / rope_scaling stay top-level too: transformers 4.x reads only those (and would
        # silently fall back to theta 10000), 5.x reads rope_parameters
        d["rope_scaling"] = self.rope_scaling
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        d["architectures"] = [HF_ARCHITECTURE[self.model_type]]
        return d


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies, rescaled by wavelength band for llama3."""
    hd = config.head_dim
    # Always on the CPU (a few floats), also while building on the meta device: meta tensors have
    # no data, and meta arithmetic runs Python decompositions that import sympy (~150 MB, ~1 s).
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band
    # between interpolated smoothly (Llama 3.1 report, rope scaling).
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin: (B, 1, T, head_dim // 2), computed once per forward in fp32 (positions up to 1e5
    need the digits). Both halves of a head turn by the same angles, so half tables suffice."""
    freqs = (position_ids[..., None].float() * inv_freq)[:, None]  # (B, 1, T, hd/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x1[i], x2[i]) of a head's two halves by its angle.

    transformers' `x * cos + rotate_half(x) * sin` term for term, without materialising the
    negated, concatenated `rotate_half(x)`: products written straight into the output halves
    (see fused.rotate); with autograd, the backward is the inverse rotation and keeps nothing
    but cos / sin.
    """
    return rope(x, cos, sin)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size,
                                bias=bias and config.model_type != "qwen2")

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return self.o_proj(attend(q, k, v, mask, causal=True)), k, v


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate): the widest activations
        # silu(gate) * up; with autograd silu(gate) is recomputed in backward instead of kept
        return self.down_proj(silu_mul(gate, up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        attn_out, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaModel(nn.Module):
    """The decoder stack: token ids (or embeddings) -> final normed hidden states (B, T, hidden)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        B, T, _ = x.shape
        past_len = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_tables(self.inv_freq, position_ids, x.dtype)
        mask = build_attention_mask(attention_mask, T, past_len, True, x.device, self.config.sliding_window)
        for i, layer in enumerate(self.layers):
            past_k, past_v = cache.layer(i) if cache is not None else (None, None)
            if self.gradient_checkpointing and self.training:
                x, k, v = checkpoint(layer, x, cos, sin, mask, past_k, past_v, use_reentrant=False)
            else:
                x, k, v = layer(x, cos, sin, mask, past_k, past_v)
            if cache is not None:
                cache.store(i, k, v)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    config_class = LlamaConfig
    # forward(..., labels=) returns the summed next-token loss without the (B, T, vocab) logits; the
    # training loop reads this (computes_own_loss) to pass labels instead of taking the logits
    computes_causal_lm_loss = True

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self):
        self.model.inv_freq = rope_inverse_frequencies(self.config).to(self.lm_head.weight.device)

    def checkpoint_key(self, key: str) -> str | None:
        if key.endswith("rotary_emb.inv_freq") or (self.config.tie_word_embeddings and key == "lm_head.weight"):
            return None
        return key

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                labels=None):
        """-> logits (B, T, vocab). position_ids default to past_len + arange(T), as in transformers.

        With `labels` (B, T): -> the SUM (not transformers' mean) of the next-token cross-entropy
        over the targets labels[:, 1:] that are not -100, fp32 scalar, computed without the
        (B, T, vocab) logits (fused.causal_lm_loss): divide by the target count for the mean.
        """
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache)
        if labels is not None:
            return causal_lm_loss(self.lm_head, hidden, labels, IGNORE_INDEX)
        return self.lm_head(hidden)
