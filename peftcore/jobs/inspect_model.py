"""`peftcore inspect-model PATH`: a Hugging Face checkpoint folder described without loading its
weights: the architecture config.json describes, parameters by kind (built on the meta device), and
the weights' headers compared with the model's keys.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch import nn

from peftcore.models import checkpoint, safetensors_io

KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")
ATTENTION_PARTS = {"self_attn", "attn", "attention"}
MLP_PARTS = {"mlp", "intermediate", "output"}  # BERT: `intermediate.dense`, `output.dense`
HEAD_PARTS = {"lm_head", "classifier", "score", "pooler"}  # what maps hidden states to outputs


def describe_checkpoint(path: Path) -> list[str]:
    """The lines `peftcore inspect-model` prints. `path`: a checkpoint folder, or a name every other
    command takes ("builtin:tiny-llama", "pip:<package>")."""
    if str(path).startswith(("builtin:", "pip:")):
        from peftcore.jobs.bases import resolve_base

        path = resolve_base(str(path))
    if path.suffix.lower() == ".gguf":
        raise ValueError(f"{path} is a GGUF file; inspect-model describes checkpoint folders (config.json + "
                         "safetensors): `peftcore generate --base` runs it, load_pretrained loads it")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder" if path.exists() else f"{path} does not exist")
    hf_config = checkpoint.read_config(path)
    model = checkpoint.build_on_meta(hf_config)
    return describe_architecture(hf_config, model) + describe_parameters(model) + describe_weights(path, model)


def first(config: dict, *names: str, default=None):
    """The first of `names` that config.json sets: families spell the same thing differently."""
    return next((config[n] for n in names if config.get(n) is not None), default)


def describe_architecture(config: dict, model: nn.Module) -> list[str]:
    heads = first(config, "num_attention_heads", "n_head")
    hidden = first(config, "hidden_size", "n_embd")
    kv_heads = first(config, "num_key_value_heads", default=heads)
    head_dim = first(config, "head_dim", default=hidden // heads if hidden and heads else None)
    intermediate = first(config, "intermediate_size", "n_inner", default=4 * hidden if hidden else None)
    return [
        f"model: {(config.get('architectures') or ['(no architectures)'])[0]}, family {config.get('model_type')} "
        f"(peftcore class {type(model).__name__})",
        f"  layers {first(config, 'num_hidden_layers', 'n_layer')}, hidden {hidden}, "
        f"heads {heads} (kv heads {kv_heads}, head_dim {head_dim}), intermediate {intermediate}, "
        f"vocab {config.get('vocab_size')}",
        f"  positions: {describe_positions(config, model)}",
    ]


def describe_positions(config: dict, model: nn.Module) -> str:
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "rope_theta"):  # parsed by the family, so old and new spellings agree
        scaling = getattr(model_config, "rope_scaling", None) or {}
        rope = f"rope, theta {model_config.rope_theta:g}, type {scaling.get('rope_type', 'default')}"
        if scaling:
            rope += f" (factor {scaling['factor']:g}, original context {scaling['original_max_position_embeddings']})"
        window = getattr(model_config, "sliding_window", None)
        return rope + (f", sliding window {window}" if window else "")
    return f"learned, max {first(config, 'max_position_embeddings', 'n_positions')}"


def module_kind(name: str, module: nn.Module) -> str:
    """Which row of the parameter table a module's own parameters belong to."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "norm" in type(module).__name__.lower():  # RMSNorm, nn.LayerNorm
        return "norms"
    parts = set(name.split("."))
    for kind, names in (("head", HEAD_PARTS), ("attention", ATTENTION_PARTS), ("mlp", MLP_PARTS)):
        if parts & names:
            return kind
    return "other"


def count_parameters(model: nn.Module) -> tuple[Counter, list[str]]:
    """-> (numel per kind, names of parameters tied to one counted earlier). Tied weights count once."""
    counts: Counter = Counter({kind: 0 for kind in KINDS})
    seen: set[int] = set()
    tied: list[str] = []
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                tied.append(f"{name}.{pname}")
                continue
            seen.add(id(param))
            counts[module_kind(name, module)] += param.numel()
    return counts, tied


def describe_parameters(model: nn.Module) -> list[str]:
    counts, tied = count_parameters(model)
    total = sum(counts.values())
    lines = [f"parameters: {total:,} ({human_count(total)})"]
    for kind in KINDS:
        if counts[kind] or kind in ("embeddings", "head"):
            lines.append(f"  {kind:<11} {counts[kind]:>15,}")
    lines += [f"  (tied, counted once: {name})" for name in tied]
    return lines


def describe_weights(path: Path, model: nn.Module) -> list[str]:
    try:
        files = checkpoint.checkpoint_files(path)
    except FileNotFoundError:  # (an index naming absent shards is a CheckpointError: reported, not hidden)
        return ["weights: none -- config.json only, no model.safetensors or model.safetensors.index.json; "
                "nothing to load (the counts above come from the config)"]
    headers = {file: safetensors_io.read_header(file)[0] for file in files}
    dtypes = Counter(info["dtype"] for header in headers.values() for info in header.values())
    size = sum(file.stat().st_size for file in files)
    return [
        f"weights: {len(files)} file(s), {human_bytes(size)} on disk, "
        + ", ".join(f"{dtype} x{n}" for dtype, n in sorted(dtypes.items())),
        "  keys: " + compare_keys(model, headers),
    ]


def compare_keys(model: nn.Module, headers: dict) -> str:
    """Checkpoint keys (as the model names them) and shapes against the model's, headers only."""
    wanted = {k: tuple(v.shape) for k, v in checkpoint.expected_keys(model).items()}
    found: dict[str, tuple] = {}
    unexpected: list[str] = []
    for header in headers.values():
        for ckpt_key, info in header.items():
            key = model.checkpoint_key(ckpt_key)
            if key in wanted:
                found[key] = tuple(info["shape"])
            elif key is not None:
                unexpected.append(ckpt_key)
    missing = sorted(set(wanted) - set(found))
    misshaped = [f"{k} {found[k]} vs {wanted[k]}" for k in sorted(found) if found[k] != wanted[k]]
    if not (missing or unexpected or misshaped):
        return f"all {len(wanted)} match the model"
    problems = [(missing, "missing"), (sorted(unexpected), "unexpected"), (misshaped, "mis-shaped (file vs model)")]
    return "; ".join(f"{len(items)} {what}: {abbreviate(items)}" for items, what in problems if items)


def abbreviate(items: list[str], keep: int = 3) -> str:
    return ", ".join(items[:keep]) + (f", ... ({len(items) - keep} more)" if len(items) > keep else "")


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
