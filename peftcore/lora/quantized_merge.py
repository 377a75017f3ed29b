"""merge_and_unload on a quantized base (QLoRA): dequantize, merge, and say what re-quantizing would cost.

A merged weight W' = dequant(Q) + s*B*A is exact in the dense model returned; it is generally no
longer representable in the 4-bit grid, so the report gives, per layer, the relative error that
quantizing the merged weight again with the same method would add: ||Q(W') - W'||_F / ||W'||_F.
"""
from __future__ import annotations

import torch
from torch import nn

from peftcore.lora.layer import LoraLinear
from peftcore.models.layers import Conv1D
from peftcore.models.quantized import QuantLinear


def densify(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear -> its dequantized dense layer, LoRA bases and the layers no adapter targeted
    alike (the merged model must be a plain checkpoint, not packed codes). -> {name: the QuantLinear}
    for the LoRA bases, keyed by the LoRA layer's name: the layers a merge changes."""
    merged = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, dense_linear(module))
            if isinstance(owner, LoraLinear):
                merged[parent] = module
    return merged


@torch.no_grad()
def dense_linear(quantized: QuantLinear) -> nn.Module:
    """nn.Linear, or a Conv1D for a GPT-2 layer (its checkpoint layout, and HF PEFT's fan_in_fan_out)."""
    weight = quantized.dequantize(quantized.compute_dtype)
    if quantized.conv1d_layout:
        conv = Conv1D(quantized.out_features, quantized.in_features).to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight.T)
        conv.bias.copy_(quantized.bias)
        return conv.requires_grad_(False)
    dense = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    dense.weight.copy_(weight)
    if quantized.bias is not None:
        dense.bias.copy_(quantized.bias)
    return dense.requires_grad_(False)


@torch.no_grad()
def requantization_report(model: nn.Module, replaced: dict[str, QuantLinear]) -> dict[str, float]:
    """Per merged layer: relative Frobenius error of quantizing its merged weight again."""
    report = {}
    for name, quantized in replaced.items():
        module = model.get_submodule(name)
        merged = (module.weight.T if quantized.conv1d_layout else module.weight).float()  # (out, in)
        probe = QuantLinear.from_linear(module, quantized.method, quantized.group_size, quantized.double_quant)
        error = torch.linalg.norm(probe.dequantize(torch.float32) - merged) / torch.linalg.norm(merged).clamp_min(1e-30)
        report[name] = float(error)
    return report


def format_merge_report(report: dict[str, float]) -> str:
    if not report:
        return "merge: no quantized layers"
    worst = max(report, key=report.get)
    mean = sum(report.values()) / len(report)
    return (f"merged {len(report)} quantized layers into dense weights (exact); re-quantizing them would add "
            f"a relative error of {mean:.2%} on average, {report[worst]:.2%} at worst ({worst})")
