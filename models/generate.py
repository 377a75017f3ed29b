"""Autoregressive decoding with a KV cache: one prefill, then one token per step."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """The decoding choices a person makes: a recipe's [eval] section and `peftcore generate`'s flags
    are these fields (peftcore.jobs.recipe.EvalSection extends it; the CLI adds one flag per field)."""

    max_new_tokens: int = 40  # tokens generated per answer at most (EOS stops sooner)
    temperature: float = 0.0  # 0: greedy; > 0 samples from softmax(logits / temperature)
    top_k: int | None = None  # sample among the k likeliest tokens; 0 or None: off
    top_p: float | None = None  # sample among the likeliest tokens holding mass p (nucleus); None or 1: off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class SamplingConfig(SamplingOptions):
    """How generate() decodes, passed whole: the options plus the stop and pad tokens. eos_token_id None:
    the model config's eos_token_id (as transformers' generate); [] never stops. pad_token_id None: EOS
    (else 0) pads rows that finished."""

    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def of(cls, settings, **overrides) -> SamplingConfig:
        """The sampling fields an object holds (e.g. a recipe's [eval] section), then `overrides` that are set."""
        given = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls().with_overrides(**given, **overrides)

    def with_overrides(self, **overrides) -> SamplingConfig:
        """This config with the given values that are not None (None: keep this config's)."""
        return replace(self, **{name: value for name, value in overrides.items() if value is not None})


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' generate: count real tokens, so a left-padded row starts at position 0."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: (B, V). As transformers: top_k 0 (or
    None) is off, and the top token always survives (top_p = 0 is greedy sampling)."""
    if top_k is not None and top_k < 0 or top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={top_k}, top_p={top_p}")
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p: the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[:, 0] = False  # top_p = 0: the mass before the top token (0) already "reaches" it
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next_token(logits, sampling: SamplingConfig, generator) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids; greedy at temperature 0."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def full_mask(attention_mask: torch.Tensor, covered: int) -> torch.Tensor:
    """Prepend ones for positions the caller's mask does not cover (a learned prefix / prompt)."""
    extra = covered - attention_mask.shape[-1]
    if extra <= 0:
        return attention_mask
    ones = attention_mask.new_ones(attention_mask.shape[0], extra)
    return torch.cat([ones, attention_mask], dim=-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    inputs_embeds: torch.Tensor | None = None,
    cache=None,
    *,
    sampling: SamplingConfig | None = None,
) -> torch.Tensor:
    """-> (B, T + new) token ids. Rows that hit EOS are padded (pad_token_id, else EOS) after it.

    `sampling` holds the decoding options whole (default SamplingConfig(): 40 new tokens, greedy); the
    keyword options, where given (not None), override its values.
    `cache` may arrive pre-filled (prefix tuning) and `inputs_embeds` may be longer than
    `input_ids` (prompt tuning); the mask is extended with ones in front to cover both.
    """
    sampling = (sampling or SamplingConfig()).with_overrides(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id)
    B, T = input_ids.shape
    cache = model.new_cache() if cache is None else cache
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prefill_len = T if inputs_embeds is None else inputs_embeds.shape[1]
    mask = full_mask(attention_mask, cache.seq_len + prefill_len)
    positions = positions_from_mask(mask)
    eos, pad = stop_tokens(model, sampling, input_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids = input_ids if inputs_embeds is None else None
    logits = model(ids, attention_mask=mask, position_ids=positions[:, -prefill_len:], inputs_embeds=inputs_embeds,
                   cache=cache)
    new_tokens = []
    for step in range(sampling.max_new_tokens):
        token = pick_next_token(logits[:, -1], sampling, generator)
        token = token.masked_fill(finished, pad)
        new_tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or step == sampling.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(token[:, None], attention_mask=mask, position_ids=positions, cache=cache)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids


def stop_tokens(model, sampling: SamplingConfig, device) -> tuple[torch.Tensor, int]:
    """-> (the EOS ids as a tensor, the pad id): eos_token_id None is the model config's."""
    eos_token_id = sampling.eos_token_id
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       dtype=torch.long, device=device)
    pad = sampling.pad_token_id if sampling.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    return eos, pad
