"""Strict JSON for the files peftcore writes (metrics.jsonl, inspect reports): NaN and inf are not
JSON, and `json.dumps` writes them as bare NaN / Infinity tokens that other languages' parsers reject."""
from __future__ import annotations

import math


def json_safe(value):
    """NaN / inf -> None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
