"""Prompt tuning, P-tuning and prefix tuning: encoders, and how prompts enter a model (configs: prompt/configs.py).

Prompt tuning / P-tuning prepend `n` learned vectors to the input embeddings; prefix tuning feeds
learned keys and values to every attention layer through the model's KV cache. Field names,
module names (`embedding`, `mlp_head`, `lstm_head`, `transform`) and the saved tensor
(`prompt_embeddings`, the encoder's OUTPUT) follow HF PEFT, so adapters move both ways.

In inference mode an encoder is just its `embedding` table holding the saved prompts, as in PEFT.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from peftcore.models.fused import IGNORE_INDEX
from peftcore.prompt.configs import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    fill_from_model,
)


class PromptEmbedding(nn.Module):
    """Prompt tuning: the prompts are the parameters."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        n = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(n, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        ids = init_token_ids(config, word_embeddings.num_embeddings, n)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def init_token_ids(config: PromptTuningConfig, vocab_size: int, n: int) -> torch.Tensor:
    """SAMPLE_VOCAB: n random tokens. TEXT: the init text's tokens, repeated or cut to n (as PEFT)."""
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (n,))
    from peftcore.models import load_tokenizer

    ids = load_tokenizer(config.tokenizer_name_or_path).encode(config.prompt_tuning_init_text)
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} encodes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return torch.tensor(ids)


class PromptEncoder(nn.Module):
    """P-tuning: virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM + MLP."""

    def __init__(self, config: PromptEncoderConfig):
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, d)
        self.reparameterize = not config.inference_mode
        if not self.reparameterize:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)  # (B, n, d)
        if not self.reparameterize:
            return x
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]  # (B, n, 2h)
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning: (n, L * 2 * token_dim) keys and values, directly or through a tanh MLP."""

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        n, d, L = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, L * 2 * d))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, L * 2 * d)
            last = self.embedding
        if config.init_weights == "zero":
            nn.init.zeros_(last.weight)
            if getattr(last, "bias", None) is not None:
                nn.init.zeros_(last.bias)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.prefix_projection else x


def build_encoder(config: PromptLearningConfig, word_embeddings: nn.Embedding) -> nn.Module:
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config)
    return PrefixEncoder(config)


def encoder_for(config: PromptLearningConfig, model: nn.Module, loading: bool = False) -> nn.Module:
    """`config`'s encoder for `model` (config's sizes filled from the model), on the model's device."""
    fill_from_model(config, model)
    # loading overwrites the prompts: skip a TEXT init's tokenizer
    if loading and hasattr(config, "prompt_tuning_init"):
        config = replace(config, prompt_tuning_init=PromptTuningInit.RANDOM)
    embeddings = input_embeddings(model)
    return build_encoder(config, embeddings).to(embeddings.weight.device)


def encoder_output(encoder: nn.Module, config: PromptLearningConfig) -> torch.Tensor:
    """(n, token_dim) prompts, or (n, L * 2 * token_dim) for prefix tuning: what PEFT saves."""
    n = config.num_virtual_tokens * (1 if isinstance(config, PrefixTuningConfig) else config.num_transformer_submodules)
    indices = torch.arange(n, device=encoder.embedding.weight.device)
    return encoder(indices[None])[0]


def prefix_keys_values(prefix: torch.Tensor, config: PrefixTuningConfig, batch_size: int):
    """(n, L * 2 * kv_heads * hd) -> per layer key and value, each (B, kv_heads, n, hd)."""
    n, heads = config.num_virtual_tokens, config.num_attention_heads
    kv = prefix.view(n, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(1, 2, 0, 3)  # (2L, heads, n, hd): PEFT's order, keys of layer i at 2i, values at 2i + 1
    kv = kv[:, None].expand(-1, batch_size, -1, -1, -1)  # (2L, B, heads, n, hd)
    return list(kv[0::2]), list(kv[1::2])


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding table of a peftcore or transformers model (`get_input_embeddings` if it has one)."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("embed_tokens", "wte", "word_embeddings"):
            return module
    raise ValueError(f"{type(model).__name__} has no token embedding (embed_tokens / wte / word_embeddings)")


def prompt_kwargs(encoder: nn.Module, config: PromptLearningConfig, word_embeddings: nn.Embedding, input_ids,
                  attention_mask, inputs_embeds, kwargs: dict) -> dict:
    """The base model's keyword arguments with the prompt put in: a longer `inputs_embeds` (prompt and
    P-tuning) or a pre-filled `cache` (prefix), and the attention mask extended to cover it."""
    from peftcore.models import KVCache

    n = config.num_virtual_tokens
    batch = input_ids if input_ids is not None else inputs_embeds
    B = batch.shape[0]
    kwargs = dict(kwargs)
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids cannot be combined with prompt methods: the prompt shifts every position")
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
    prompt = encoder_output(encoder, config)
    if isinstance(config, PrefixTuningConfig):
        dtype = word_embeddings.weight.dtype
        keys, values = prefix_keys_values(prompt.to(dtype), config, B)
        return {**kwargs, "input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                "cache": KVCache.from_prefix(keys, values)}
    embeds = word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
    embeds = torch.cat([prompt.to(embeds.dtype)[None].expand(B, -1, -1), embeds], dim=1)  # (B, n + T, d)
    if kwargs.get("labels") is not None:
        kwargs["labels"] = labels_over_prompt(kwargs["labels"], n)
    if kwargs.get("token_type_ids") is not None:  # BERT: the prompt belongs to the first segment
        kwargs["token_type_ids"] = torch.cat([kwargs["token_type_ids"].new_zeros(B, n), kwargs["token_type_ids"]],
                                             dim=1)
    return {**kwargs, "input_ids": None, "inputs_embeds": embeds, "attention_mask": attention_mask}


def prompted_forward(model: nn.Module, encoder: nn.Module, config: PromptLearningConfig, input_ids=None,
                     attention_mask=None, inputs_embeds=None, **kwargs):
    """The model's forward with the prompt put in; per-token outputs cover the input tokens only."""
    full = prompt_kwargs(encoder, config, input_embeddings(model), input_ids, attention_mask, inputs_embeds, kwargs)
    T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    return drop_prompt_positions(model(**full), config, T)


def prompt_prefill(encoder: nn.Module, config: PromptLearningConfig, word_embeddings: nn.Embedding,
                   input_ids) -> dict:
    """generate()'s prefill arguments: the prompted `inputs_embeds`, and for prefix tuning the prefilled `cache`.
    No gradient: decoding does not train."""
    with torch.no_grad():
        full = prompt_kwargs(encoder, config, word_embeddings, input_ids, None, None, {})
    return {"inputs_embeds": full["inputs_embeds"], "cache": full.get("cache")}


def labels_over_prompt(labels: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) -> (B, n + T) labels for a fused-loss forward after a prepended prompt: the virtual
    positions have no targets, and neither has the first real token (HF PEFT trains it from the last
    virtual position), so the trained targets are labels[:, 1:], the same as without a prompt."""
    ignored = labels.new_full((labels.shape[0], n + 1), IGNORE_INDEX)
    return torch.cat([ignored, labels[:, 1:]], dim=1)


def drop_prompt_positions(output: torch.Tensor, config: PromptLearningConfig, input_len: int) -> torch.Tensor:
    """Per-token outputs cover n + T positions after a prepended prompt: keep the T real ones."""
    n = config.num_virtual_tokens
    if isinstance(config, PrefixTuningConfig) or output.ndim != 3 or output.shape[1] != n + input_len:
        return output
    return output[:, n:]


def saved_prompt_tensors(encoder: nn.Module, config: PromptLearningConfig) -> dict[str, torch.Tensor]:
    """HF PEFT's file: one tensor, the encoder's output."""
    with torch.no_grad():
        return {"prompt_embeddings": encoder_output(encoder, config).detach()}


def load_prompt_embeddings(encoder: nn.Module, prompts: torch.Tensor, where: str) -> None:
    """Saved prompts become the `embedding` table (the encoder runs in inference mode: output = table)."""
    table = encoder.embedding.weight
    if tuple(prompts.shape) != tuple(table.shape):
        raise ValueError(f"{where}: prompt_embeddings has shape {tuple(prompts.shape)} but this model needs "
                         f"{tuple(table.shape)} (an adapter for a model of another width or depth?)")
    with torch.no_grad():
        table.copy_(prompts)
