"""Inspection of live models: what learned prompts resemble, and how loud each adapter branch is.

prompt_stats: norms of the virtual tokens next to the vocabulary's, and each virtual token's nearest
vocabulary tokens by cosine (what a soft prompt "reads like").
AdapterActivations: forward hooks that measure, per LoRA layer, the RMS of the adapter branch
(output - base output) against the base branch's: a layer whose ratio stays ~0 learned nothing.
training_stats: the per-layer numbers the training loop logs every `inspect_every` steps.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from peftcore.analysis.lowrank import layer_stats
from peftcore.analysis.prompts import prompt_tensor_stats
from peftcore.lora.conv import LoraConv
from peftcore.lora.layer import LoraLinear, base_weight
from peftcore.peft_model import PeftModel
from peftcore.prompt.configs import PrefixTuningConfig, PromptLearningConfig
from peftcore.prompt.encoders import encoder_output, input_embeddings


@torch.no_grad()
def prompt_stats(peft_model, top_k: int = 5, tokenizer=None, adapter_name: str | None = None) -> dict:
    """Virtual-token norms and nearest vocabulary tokens (cosine) of a prompt-learning adapter
    (prefix: per-layer key / value norms): peftcore.analysis.prompts.prompt_tensor_stats on the live prompts,
    the same numbers `peftcore inspect` reads from the adapter's files."""
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[name]
    prompts = encoder_output(peft_model.prompt_encoder[name], config)  # (n, d) or (n, L*2*d)
    vocab = None if isinstance(config, PrefixTuningConfig) else input_embeddings(peft_model.model).weight
    return prompt_tensor_stats(prompts, config.peft_type.value, config.num_layers, vocab, tokenizer, top_k)


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


class AdapterActivations:
    """with AdapterActivations(peft_model) as acts: model(...); acts.summary() -> {layer: stats}.

    The hook re-runs the frozen base layer on the same input (no grad) to split the output into
    base and adapter branches, so monitoring costs about one extra base GEMM per adapted layer.
    """

    def __init__(self, model: nn.Module):
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no LoRA layers to monitor")
        self.records: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.handles = []

    def hook(self, name: str):
        def record(module: LoraLinear, args, output):
            with torch.no_grad():
                base = module.base_layer(args[0])
                self.records[name].append((rms(base), rms(output - base)))
        return record

    def __enter__(self) -> "AdapterActivations":
        self.handles = [layer.register_forward_hook(self.hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, pairs in self.records.items():
            base = sum(b for b, _ in pairs) / len(pairs)
            adapter = sum(a for _, a in pairs) / len(pairs)
            out[name] = {"base_rms": base, "adapter_rms": adapter, "ratio": adapter / max(base, 1e-30),
                         "calls": len(pairs)}
        return out


LOGGED = ("relative_delta", "delta_fro", "delta_spectral", "effective_rank", "stable_rank", "norm_A", "norm_B")


@torch.no_grad()
def training_stats(model: nn.Module, activations: dict[str, dict] | None = None) -> dict[str, dict]:
    """{layer: statistics} of the active adapter, for metrics.jsonl: the low-rank path of
    peftcore.analysis.lowrank (no out x in product; one dequantize per quantized base), plus the adapter /
    base activation RMS ratio when `activations` (an AdapterActivations summary) is given.
    Prompt methods: {"prompt": {"virtual_token_norms": [...]}} (prefix: per-layer key / value norms)."""
    if isinstance(model, PeftModel) and isinstance(model.peft_config[model.active_adapters[0]], PromptLearningConfig):
        stats = prompt_stats(model, top_k=1)
        if stats["method"] == "PREFIX_TUNING":
            return {"prompt": {k: stats[k] for k in ("key_norm_per_layer", "value_norm_per_layer")}}
        return {"prompt": {"virtual_token_norms": [round(t["norm"], 6) for t in stats["virtual_tokens"]]}}
    out = {}
    for name, layer in lora_layers(model).items():
        adapter = layer.active_adapters[0]
        magnitude = layer.lora_magnitude_vector[adapter].weight if adapter in layer.lora_magnitude_vector else None
        stats = layer_stats(name, layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float(),
                            layer.scaling[adapter], base_weight(layer.base_layer).float(), magnitude)
        out[name] = {key: round(getattr(stats, key), 6) for key in LOGGED}
        if stats.magnitude_change is not None:
            out[name]["magnitude_change"] = stats.magnitude_change
        if activations and name in activations:
            out[name]["activation_ratio"] = round(activations[name]["ratio"], 6)
    return out


def lora_layers(model: nn.Module) -> dict[str, LoraLinear | LoraConv]:
    """LoRA layers by the names adapter files use: without PeftModel's "base_model.model." (nor a
    MultiTaskModel's "backbone." before it)."""
    return {name.partition("base_model.model.")[2] or name: m for name, m in model.named_modules()
            if isinstance(m, (LoraLinear, LoraConv))}
