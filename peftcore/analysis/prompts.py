"""What a prompt-learning adapter learned, from its files: prompt tuning, P-tuning, prefix tuning.

Each saves one tensor, the prompt encoder's output. `prompt_tensor_stats` reads it: virtual-token
norms (next to the vocabulary's norm distribution) and each virtual token's nearest vocabulary
tokens by cosine, which needs only the base's input-embedding matrix; prefix tuning: per-layer key
/ value norms. From files here; from a live model in peftcore.analysis.live.prompt_stats.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from peftcore.adapter_io import adapter_weights, read_adapter_config
from peftcore.models import safetensors_io

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
PROMPT_KEY = "prompt_embeddings"  # HF PEFT's one tensor for every prompt-learning method
EMBEDDING_KEY = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings)\.weight$")  # Llama-family, GPT-2, BERT


def is_prompt_adapter(config: dict) -> bool:
    return config.get("peft_type") in PROMPT_TYPES


def read_prompt_adapter(folder: str | Path) -> tuple[dict, torch.Tensor]:
    """A prompt-learning adapter's config and its saved prompts (ours or HF PEFT's): no model needed."""
    config = read_adapter_config(folder)
    if not is_prompt_adapter(config):
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not a prompt method "
                         f"({', '.join(PROMPT_TYPES)})")
    path, shapes, tensors = adapter_weights(folder)
    if PROMPT_KEY not in shapes:
        raise ValueError(f"{path}: no {PROMPT_KEY} tensor (found: {', '.join(sorted(shapes)) or 'nothing'})")
    return config, next(t for k, t in tensors if k == PROMPT_KEY).float()


def base_input_embeddings(base: str | Path) -> torch.Tensor:
    """The base's token-embedding matrix (V, d) as stored: the one tensor read from its checkpoint."""
    from peftcore.models.checkpoint import checkpoint_files

    for file in checkpoint_files(Path(base)):
        header, _ = safetensors_io.read_header(file)
        key = next((k for k in header if EMBEDDING_KEY.search(k)), None)
        if key is not None:
            return next(safetensors_io.iter_tensors(file, [key]))[1]
    raise ValueError(f"{base}: no token embedding (embed_tokens / wte / word_embeddings .weight) in its checkpoint")


@torch.no_grad()
def prompt_tensor_stats(prompts: torch.Tensor, peft_type: str, num_layers: int | None = None,
                        vocab: torch.Tensor | None = None, tokenizer=None, top_k: int = 5) -> dict:
    """What a prompt-learning adapter learned, from its prompt tensor (the encoder's output, what PEFT saves).

    Prompt / P-tuning, prompts (n, d): each virtual token's norm; with the base's input embeddings
    `vocab` (V, d) also its top_k nearest vocabulary tokens by cosine (decoded when a tokenizer is
    given), where its norm falls among the vocabulary's (percentile) and that distribution.
    Prefix tuning, prompts (n, L * 2 * kv_dim): per layer, the key and the value norms."""
    if peft_type == "PREFIX_TUNING":
        return prefix_stats(prompts, num_layers)
    prompts = prompts.float()
    tokens = [{"norm": float(p.norm())} for p in prompts]
    stats = {"method": peft_type, "num_virtual_tokens": len(tokens), "virtual_tokens": tokens}
    if vocab is None:
        return stats
    if vocab.shape[-1] != prompts.shape[-1]:
        raise ValueError(f"the prompts are {prompts.shape[-1]} wide but the base's token embeddings {vocab.shape[-1]}: "
                         "an adapter for another base? pass --base")
    cosine, ids, norms = nearest_vocabulary(prompts, vocab, top_k)
    for entry, row_cos, row_ids in zip(tokens, cosine.tolist(), ids.tolist()):
        entry["vocab_percentile"] = round(100 * float((norms < entry["norm"]).float().mean()), 2)
        entry["nearest_ids"], entry["cosine"] = row_ids, [round(c, 4) for c in row_cos]
        if tokenizer is not None:
            entry["nearest_tokens"] = [tokenizer.decode([t], skip_special_tokens=False) for t in row_ids]
    stats["vocab_norm"] = norm_distribution(norms)
    return stats


def nearest_vocabulary(prompts: torch.Tensor, vocab: torch.Tensor, top_k: int, chunk: int = 8192):
    """-> (cosine (n, k), ids (n, k), vocabulary row norms (V,)), a chunk of rows at a time: a
    150k x 8k bf16 table never becomes one float32 copy."""
    unit = F.normalize(prompts.float().to(vocab.device), dim=-1)
    k = min(top_k, vocab.shape[0])
    best = torch.empty(unit.shape[0], 0, device=vocab.device)
    best_ids = torch.empty(unit.shape[0], 0, dtype=torch.long, device=vocab.device)
    norms = []
    for start in range(0, vocab.shape[0], chunk):
        rows = vocab[start : start + chunk].float()
        norms.append(rows.norm(dim=-1))
        cosine = torch.cat([best, unit @ F.normalize(rows, dim=-1).T], dim=1)
        ids = torch.cat(
            [best_ids, torch.arange(start, start + rows.shape[0], device=vocab.device).expand(unit.shape[0], -1)], 1)
        best, where = cosine.topk(k, dim=-1)
        best_ids = ids.gather(1, where)
    return best.cpu(), best_ids.cpu(), torch.cat(norms).cpu()


def norm_distribution(norms: torch.Tensor, bins: int = 30) -> dict:
    """Summary and histogram of the vocabulary's row norms (what the plot draws the prompts against)."""
    counts, edges = torch.histogram(norms.double(), bins=bins)
    return {"mean": float(norms.mean()), "std": float(norms.std()) if norms.numel() > 1 else 0.0,
            "min": float(norms.min()), "median": float(norms.median()), "max": float(norms.max()),
            "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts]}}


def prefix_stats(prompts: torch.Tensor, num_layers: int | None) -> dict:
    """Per layer key / value norms of a prefix (n, L * 2 * kv_dim): PEFT's layout puts layer i's keys
    then its values (peftcore.prompt.encoders.prefix_keys_values), so a (n, L, 2, kv_dim) view splits them."""
    n, width = prompts.shape
    if not num_layers or width % (2 * num_layers):
        raise ValueError(f"a prefix of shape {(n, width)} does not split into num_layers={num_layers} x (key, value)")
    norms = prompts.float().reshape(n, num_layers, 2, -1).norm(dim=-1)  # (n, L, 2): one vector per token and layer
    return {"method": "PREFIX_TUNING", "num_virtual_tokens": n, "num_layers": num_layers,
            "key_norm_per_layer": norms[:, :, 0].mean(0).tolist(),
            "value_norm_per_layer": norms[:, :, 1].mean(0).tolist(),
            "key_norms": norms[:, :, 0].T.tolist(), "value_norms": norms[:, :, 1].T.tolist()}  # [layer][token]


def inspect_prompt_adapter(folder: str | Path, base: str | Path | None = None, tokenizer=None, top_k: int = 5) -> dict:
    """prompt_tensor_stats of the adapter in `folder`; the base checkpoint adds the nearest vocabulary
    tokens (prefix tuning has none: its vectors are keys and values, not token embeddings)."""
    config, prompts = read_prompt_adapter(folder)
    prefix = config["peft_type"] == "PREFIX_TUNING"
    vocab = base_input_embeddings(base) if base is not None and not prefix else None
    stats = prompt_tensor_stats(prompts, config["peft_type"], config.get("num_layers"), vocab, tokenizer, top_k)
    return {"adapter": str(folder), "base": None if vocab is None else str(base), **stats}


def format_prompt_table(stats: dict) -> str:
    if stats["method"] == "PREFIX_TUNING":
        head = (f"{'layer':>5} {'key norm':>10} {'value norm':>10}   "
                f"(mean over {stats['num_virtual_tokens']} virtual tokens)")
        rows = [f"{i:>5} {k:10.4f} {v:10.4f}" for i, (k, v) in
                enumerate(zip(stats["key_norm_per_layer"], stats["value_norm_per_layer"]))]
        return "\n".join([head, "-" * len(head), *rows])
    head = f"{'token':>5} {'norm':>9} {'vocab pct':>9}  nearest vocabulary tokens (cosine)"
    rows = [head, "-" * len(head)]
    for i, t in enumerate(stats["virtual_tokens"]):
        pct = f"{t['vocab_percentile']:9.1f}" if "vocab_percentile" in t else f"{'-':>9}"
        decoded = t.get("nearest_tokens")  # repr: a token's leading space or newline stays visible
        names = [repr(s) for s in decoded] if decoded else [f"#{token}" for token in t.get("nearest_ids", [])]
        nearest = ", ".join(f"{name} {c:.3f}" for name, c in zip(names, t.get("cosine", []))) or "-"
        rows.append(f"{i:>5} {t['norm']:9.4f} {pct}  {nearest}")
    if "vocab_norm" in stats:
        v = stats["vocab_norm"]
        rows.append(f"vocabulary norms: mean {v['mean']:.4f}, std {v['std']:.4f}, "
                    f"min {v['min']:.4f}, median {v['median']:.4f}, max {v['max']:.4f}")
    return "\n".join(rows)


def write_prompt_json(stats: dict, path: str | Path) -> Path:
    Path(path).write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
