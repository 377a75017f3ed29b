"""Attention masking and the one call into scaled_dot_product_attention every family shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    causal: bool,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, q_len, past_len + q_len), True = may attend; None = plain causal.

    `attention_mask` is transformers' (B, past_len + q_len) 0/1 padding mask covering cached and
    new tokens. Returning None lets SDPA take its `is_causal` fast path; that path aligns the
    triangle top-left, so it is only right when nothing is cached.
    """
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but cache + input hold {kv_len}"
            )
        if bool(attention_mask.all()):  # no padding (as transformers checks): keep SDPA's causal fast path,
            attention_mask = None  # which skips the key blocks above the diagonal, and build no mask
    windowed = window is not None and kv_len > window
    if attention_mask is None and not windowed and (not causal or past_len == 0):
        return None
    mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        mask = mask & (k_pos <= q_pos)
        if windowed:  # Mistral's sliding window: a query sees its last `window` positions only
            mask = mask & (q_pos - k_pos < window)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    # A query row with nothing to attend to (a left-pad token) would give NaN, and 0 * NaN poisons
    # the real rows through V. Let such rows attend everywhere; their outputs are never used.
    return mask | ~mask.any(dim=-1, keepdim=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q: (B, n_head, T, hd); k, v: (B, n_kv_head, S, hd) -> (B, T, n_head * hd)."""
    is_causal = causal and mask is None and q.shape[-2] > 1
    gqa = k.shape[1] != q.shape[1]  # SDPA broadcasts KV heads itself: no repeat_interleave copy
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    B, H, T, D = out.shape
    return out.transpose(1, 2).reshape(B, T, H * D)
