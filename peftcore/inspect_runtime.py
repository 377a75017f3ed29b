"""Inspection of live models: what learned prompts resemble, and how loud each adapter branch is.

prompt_stats: norms of the virtual tokens next to the vocabulary's, and each virtual token's nearest
vocabulary tokens by cosine (what a soft prompt "reads like").
AdapterActivations: forward hooks that measure, per LoRA layer, the RMS of the adapter branch
(output - base output) against the base branch's: a layer whose ratio stays ~0 learned nothing.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .lora import LoraLinear
from .prompt import PrefixTuningConfig, encoder_output, input_embeddings


@torch.no_grad()
def prompt_stats(peft_model, top_k: int = 5, tokenizer=None, adapter_name: str | None = None) -> dict:
    """Virtual-token norms and nearest vocabulary tokens (cosine) of a prompt-learning adapter."""
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[name]
    prompts = encoder_output(peft_model.prompt_encoder[name], config).float()  # (n, d) or (n, L*2*d)
    if isinstance(config, PrefixTuningConfig):
        per_layer = prompts.view(config.num_virtual_tokens, config.num_layers, 2, -1).norm(dim=-1)  # (n, L, 2)
        return {"method": "prefix", "key_norm_per_layer": per_layer[:, :, 0].mean(0).tolist(),
                "value_norm_per_layer": per_layer[:, :, 1].mean(0).tolist()}
    vocab = input_embeddings(peft_model.model).weight.float()  # (V, d)
    cosine = nn.functional.normalize(prompts, dim=-1) @ nn.functional.normalize(vocab, dim=-1).T  # (n, V)
    best = cosine.topk(min(top_k, vocab.shape[0]), dim=-1)
    tokens = []
    for i in range(prompts.shape[0]):
        ids = best.indices[i].tolist()
        entry = {"norm": float(prompts[i].norm()), "nearest_ids": ids, "cosine": [round(float(c), 4) for c in best.values[i]]}
        if tokenizer is not None:
            entry["nearest_tokens"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        tokens.append(entry)
    norms = vocab.norm(dim=-1)
    return {"method": config.peft_type.value, "virtual_tokens": tokens,
            "vocab_norm": {"mean": float(norms.mean()), "std": float(norms.std())}}


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


class AdapterActivations:
    """with AdapterActivations(peft_model) as acts: model(...); acts.summary() -> {layer: stats}.

    The hook re-runs the frozen base layer on the same input (no grad) to split the output into
    base and adapter branches, so monitoring costs about one extra base GEMM per adapted layer.
    """

    def __init__(self, model: nn.Module):
        # names as in the user's model (and in adapter files): without PeftModel's "base_model.model."
        self.layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
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
            out[name] = {"base_rms": base, "adapter_rms": adapter, "ratio": adapter / max(base, 1e-30), "calls": len(pairs)}
        return out
