"""Magnitude pruning of base weights, unstructured or 2:4 structured, with a sparsity report.

2:4 keeps the two largest of every four consecutive input weights of a row: the pattern NVIDIA's
sparse tensor cores (Ampere and later) execute at up to 2x dense throughput.
"""
from __future__ import annotations

import torch
from torch import nn

from peftcore.lora.layer import LoraLinear, is_conv1d

PATTERNS = ("unstructured", "2:4")
HEADS = ("lm_head", "score", "classifier")


def unstructured_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the (1 - sparsity) share of weights with the largest magnitude (exact count, ties broken by index)."""
    keep = round(weight.numel() * (1 - sparsity))
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        mask[weight.detach().abs().flatten().topk(keep).indices] = True
    return mask.view_as(weight)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) with in % 4 == 0 -> mask keeping 2 of every 4 consecutive weights of a row."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
    groups = weight.detach().abs().view(out_features, in_features // 4, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return mask.view(out_features, in_features)


def prunable_weights(model: nn.Module, skip: tuple[str, ...] = HEADS):
    """(name, (out, in) weight view) of every dense linear, looking through LoRA wrappers."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in skip or ".lora_" in name:
            continue
        if isinstance(module, LoraLinear):
            continue  # its base_layer is visited on its own
        if isinstance(module, nn.Linear):
            yield name, module.weight
        elif is_conv1d(module):  # ours or transformers' (in, out) weight
            yield name, module.weight.T


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured",
                skip: tuple[str, ...] = HEADS) -> dict:
    """Zero the smallest-magnitude base weights in place. -> {"layers": {name: sparsity}, "overall": s, ...}."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}; supported: {', '.join(PATTERNS)}")
    if pattern == "unstructured" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers, zeros, total = {}, 0, 0
    for name, weight in prunable_weights(model, skip):
        mask = two_four_mask(weight) if pattern == "2:4" else unstructured_mask(weight, sparsity)
        weight.mul_(mask)
        layer_zeros = int((weight == 0).sum())
        layers[name] = layer_zeros / weight.numel()
        zeros, total = zeros + layer_zeros, total + weight.numel()
    if not layers:
        raise ValueError(f"no prunable linear layer in {type(model).__name__} (heads {skip} are skipped)")
    return {"pattern": pattern, "layers": layers, "overall": zeros / total, "zeroed": zeros, "total": total}


def format_sparsity_report(report: dict) -> str:
    width = max(len(n) for n in report["layers"])
    lines = [f"{'layer':<{width}}  sparsity"] + [f"{n:<{width}}  {s:8.2%}" for n, s in report["layers"].items()]
    lines.append(f"{'overall (' + report['pattern'] + ')':<{width}}  {report['overall']:8.2%}  "
                 f"({report['zeroed']:,d} of {report['total']:,d})")
    return "\n".join(lines)
