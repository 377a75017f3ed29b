"""What `trainable_token_indices` rows learned: per trained token, how far its row moved from the base table's.

A row that barely moved (relative change ~ 0) is a token the data never asked for; a new special token
initialised as a copy of another row shows its cosine to that start falling as it becomes its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from peftcore.adapter_io import adapter_weights
from peftcore.analysis.base_weights import BaseCheckpoint, BaseKey

ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's on-disk key of a table's rows


@dataclass
class TokenRowStats:
    module: str  # the table, e.g. model.embed_tokens
    token: int
    norm: float  # ||row||
    change: float | None = None  # ||row - base row|| (None without a base)
    relative_change: float | None = None  # change / ||base row||
    cosine_to_base: float | None = None


def table_name(key: str) -> str:
    return key.removesuffix(ROWS_SUFFIX).removeprefix("base_model.model.")


def indices_for(module: str, config: dict) -> list[int]:
    """config's trainable_token_indices for `module`: a list names the one input embedding, a dict names tables by
    the end of their names (PEFT's rule)."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        return next(v for k, v in indices.items() if module == k or module.endswith(f".{k}"))
    return list(indices)


def inspect_token_rows(folder: str | Path, config: dict, base: str | Path | None = None) -> list[TokenRowStats]:
    """One entry per trained token of every table in the adapter at `folder` (none when it trains no rows)."""
    if config.get("trainable_token_indices") is None:
        return []
    _, _, tensors = adapter_weights(folder)
    checkpoint = BaseCheckpoint(base) if base is not None else None
    stats = []
    for key, rows in tensors:
        if key.endswith(ROWS_SUFFIX):
            module = table_name(key)
            stats += table_stats(module, indices_for(module, config), rows.double(), checkpoint)
    return stats


def table_stats(module: str, indices: list[int], rows: torch.Tensor, checkpoint: BaseCheckpoint | None):
    if len(indices) != rows.shape[0]:
        raise ValueError(f"{module}: the adapter holds {rows.shape[0]} rows but its config trains {len(indices)} "
                         "tokens (trainable_token_indices): the file and its adapter_config.json disagree")
    norms = rows.norm(dim=1)
    if checkpoint is None:
        return [TokenRowStats(module, t, float(n)) for t, n in zip(indices, norms)]
    key = checkpoint.find_key(module)
    if key is None:
        raise ValueError(f"base {checkpoint.folder} has no weight for {module}; "
                         f"its keys look like: {', '.join(checkpoint.near(module))}")
    before = checkpoint.read(BaseKey(checkpoint.files[key], key, False))[indices]  # (n, dim)
    change = (rows - before).norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(rows, before, dim=1)
    return [TokenRowStats(module, t, float(n), float(c), float(c / b) if b > 0 else None, float(cos))
            for t, n, c, b, cos in zip(indices, norms, change, before.norm(dim=1), cosine)]


def format_token_table(stats: list[TokenRowStats]) -> str:
    head = f"{'table':<32} {'token':>7} {'||row||':>9} {'||change||':>10} {'relative':>9} {'cos(base)':>9}"
    lines = [head, "-" * len(head)]
    for s in stats:
        shown = [f"{v:10.3e}" if v is not None else f"{'-':>10}" for v in (s.change,)]
        shown += [f"{v:9.3g}" if v is not None else f"{'-':>9}" for v in (s.relative_change, s.cosine_to_base)]
        lines.append(f"{s.module:<32} {s.token:>7} {s.norm:9.3g} {' '.join(shown)}")
    return "\n".join(lines)
