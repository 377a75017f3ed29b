"""What the small-vector methods learned, per adapted layer, straight from an adapter folder (no model needed):
IA3's scaling vector (how far it moved from the identity's ones), VeRA's two scaling vectors around the frozen
projections, OFT's rotation (its largest principal angle from the identity, per layer and the spread over its
blocks).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peftcore.adapter_io import adapter_weights, read_adapter_config
from peftcore.analysis.lowrank import natural_key
from peftcore.oft.layer import OftRotation, rotation_block_angles

VECTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                        r"(?P<part>ia3_l|vera_lambda_b|vera_lambda_d|oft_R\.weight)$")
REPORTED = ("IA3", "VERA", "OFT")


@dataclass
class VectorStats:
    module: str
    figures: dict = field(default_factory=dict)  # name -> value, in the order the table shows them


def vector_figures(name: str, v: torch.Tensor, centre: float) -> dict:
    """mean, min, max and the RMS distance from `centre` (IA3 starts at ones, VeRA's lambda_b at zeros)."""
    v = v.double().flatten()
    return {f"{name} mean": float(v.mean()), f"{name} min": float(v.min()), f"{name} max": float(v.max()),
            f"{name} rms-{centre:g}": float((v - centre).square().mean().sqrt())}


def oft_figures(vec: torch.Tensor, config: dict) -> dict:
    """The rotation's largest principal angle (degrees) from its stored vectors (blocks, b(b-1)/2)."""
    n, n_elements = vec.shape
    b = round((1 + math.sqrt(1 + 8 * n_elements)) / 2)  # n_elements = b(b-1)/2
    rotation = OftRotation(n, n_elements, b, n * b, bool(config.get("coft")), config.get("eps", 6e-5),
                           bool(config.get("block_share")), config.get("use_cayley_neumann", True),
                           config.get("num_cayley_neumann_terms", 5))
    with torch.no_grad():
        rotation.weight.copy_(vec.float())
    angles = torch.rad2deg(rotation_block_angles(rotation).double())
    return {"blocks": n, "block size": b, "max angle deg": float(angles.max()),
            "median block angle deg": float(angles.median())}


def inspect_method_adapter(folder: str | Path) -> list[VectorStats]:
    """One entry per adapted layer of the IA3 / VeRA / OFT adapter in `folder`."""
    config = read_adapter_config(folder)
    if config.get("peft_type") not in REPORTED:
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; this report reads {', '.join(REPORTED)}")
    stats: dict[str, VectorStats] = {}
    _, _, tensors = adapter_weights(folder)
    for key, tensor in tensors:
        if (match := VECTOR_KEY.match(key)) is None:
            continue
        entry = stats.setdefault(match["module"], VectorStats(match["module"]))
        part = match["part"]
        if part == "oft_R.weight":
            entry.figures.update(oft_figures(tensor, config))
        else:
            shown = {"ia3_l": "l", "vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}[part]
            entry.figures.update(vector_figures(shown, tensor, 1.0 if part == "ia3_l" else 0.0))
    return [stats[m] for m in sorted(stats, key=natural_key)]


def format_vector_table(stats: list[VectorStats]) -> str:
    names = list(dict.fromkeys(k for s in stats for k in s.figures))
    head = f"{'module':<44} " + " ".join(f"{n:>{max(10, len(n))}}" for n in names)
    lines = [head, "-" * len(head)]
    for s in stats:
        cells = [f"{s.figures[n]:>{max(10, len(n))}.4g}" if n in s.figures else f"{'-':>{max(10, len(n))}}"
                 for n in names]
        lines.append(f"{s.module:<44} " + " ".join(cells))
    return "\n".join(lines)


def vector_json(stats: list[VectorStats]) -> dict:
    return {"layers": [asdict(s) for s in stats]}
