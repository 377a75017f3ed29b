"""Per-layer key/value cache shared by every decoder family.

One object serves incremental decoding (`generate`) and prefix tuning, which pre-fills each layer
with learned keys/values before the real tokens arrive. Concatenation (not a preallocated ring)
keeps autograd intact through the prefix, which prefix tuning trains.
"""
from __future__ import annotations

import torch


class KVCache:
    """keys[i], values[i]: (B, n_kv_heads, T_cached, head_dim) for layer i, or None before use."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @classmethod
    def from_prefix(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "KVCache":
        """A cache holding a learned prefix: one (B, n_kv_heads, P, head_dim) pair per layer."""
        if len(keys) != len(values):
            raise ValueError(f"prefix has {len(keys)} key tensors but {len(values)} value tensors")
        cache = cls(len(keys))
        cache.keys, cache.values = list(keys), list(values)
        return cache

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def seq_len(self) -> int:
        """Tokens held so far (read before a forward starts: layers grow one by one during it)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[-2]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer_idx], self.values[layer_idx]

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's whole history. Layers return it rather than mutate the cache themselves,
        so activation checkpointing can re-run a layer without appending twice."""
        self.keys[layer_idx], self.values[layer_idx] = k, v

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Keep only the rows in `batch_index` (e.g. finished sequences dropped)."""
        self.keys = [None if k is None else k.index_select(0, batch_index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, batch_index) for v in self.values]
