"""Evaluation: sliding-window perplexity for causal LMs, plus the text metrics of
`peftcore.analysis.text_metrics` (BLEU, chrF, glossary adherence, repetition) re-exported here so users
import everything evaluative from one place.

Perplexity follows transformers' "Perplexity of fixed-length models" guide: windows of up to
`max_length` tokens start every `stride` tokens; in each window only the tokens not scored by the
previous window are targets, so every token is scored once, with up to max_length - stride tokens
of context. One deliberate difference: the guide weights each window's mean loss by
(unmasked labels - 1), which is one too few for every window after the first (its first label
is already masked, so the shift drops nothing real); here NLL is summed per scored token, so the
result is the exact token-weighted mean.

This is the same perplexity `peftcore eval` and training's evaluate() report (exp of the summed
next-token NLL over scored tokens), over a different scope: one long token stream here, the trained
(output) tokens of each record there. A stream that fits one window gives both the same number
(tests/peftcore/analysis/test_perplexity.py).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.analysis.text_metrics import (
    BleuScore,
    ChrfScore,
    bleu,
    chrf,
    glossary_adherence,
    load_terms,
    repetition,
    tokenize_13a,
    tokenize_char,
)

__all__ = [
    "BleuScore", "ChrfScore", "bleu", "chrf", "glossary_adherence", "load_terms", "perplexity", "repetition",
    "sliding_windows", "token_nll", "tokenize_13a", "tokenize_char",
]


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_new) per window: tokens [begin, end) go in, the last n_new are targets.

    Position 0 has no context and is never scored. With stride < max_length every later position
    is scored exactly once; with stride == max_length windows are disjoint and each window's
    first token is context only (the guide's behaviour, kept so numbers compare).
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length} "
                         "(stride > max_length would skip tokens)")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:  # the last window already reaches the end; later ones add nothing
            break
    return windows


def _equal_length_batches(windows, batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows, up to batch_size at a time, all of one length so they stack without
    padding (only the final window can be shorter, so this costs at most one extra forward)."""
    batch: list = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _logits(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) from our models (a tensor), transformers models (`.logits`) or a dict."""
    out = model(ids)
    if isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"model must return logits (batch, seq, vocab) with (batch, seq) = {tuple(ids.shape)}, "
                        f"got {shape}")
    return out


def _as_sequence(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be (N,) or (1, N), got shape {tuple(ids.shape)}; "
                         "concatenate documents first (the guide scores one long stream)")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {ids.numel()}")
    return ids.long()


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


@torch.no_grad()
def token_nll(model: Callable, input_ids, max_length: int, stride: int, batch_size: int = 1) -> torch.Tensor:
    """Per-position negative log-likelihood (float64, shape (N,)), NaN where a position is not
    scored (position 0; window starts when stride == max_length). Handy for spotting where in a
    document the model is surprised; `perplexity` is exp of its nan-mean."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _as_sequence(input_ids)
    device = _model_device(model)
    nll = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()  # dropout would make the number random
    try:
        for batch in _equal_length_batches(sliding_windows(ids.numel(), max_length, stride), batch_size):
            chunk = torch.stack([ids[b:e] for b, e, _ in batch])
            logits = _logits(model, chunk if device is None else chunk.to(device))
            # logits at t predict token t+1; fp32 log-softmax so bf16 models lose nothing here
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), chunk[:, 1:].to(logits.device),
                                     reduction="none").double().cpu()
            for row, (begin, end, n_new) in enumerate(batch):
                first = max(begin + 1, end - n_new)  # the window's first token has no context in it
                nll[first:end] = losses[row, first - begin - 1:]
    finally:
        if was_training:
            model.train()
    return nll


def perplexity(model: Callable, input_ids, max_length: int, stride: int, batch_size: int = 1) -> float:
    """exp(mean NLL over scored tokens) of one token stream, by the strided sliding window.

    `model`: anything mapping LongTensor (B, T) to logits (B, T, V) (our models, transformers
    models, a plain callable). `batch_size` windows run per forward; results do not depend on it.
    """
    nll = token_nll(model, input_ids, max_length, stride, batch_size)
    return math.exp(nll.nanmean().item())
