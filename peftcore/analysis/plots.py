"""Pictures of what `peftcore.analysis.lowrank` computes, for a person to look at (matplotlib, optional extra)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from peftcore.analysis.lowrank import LayerStats

LAYER = re.compile(r"\.(\d+)\.")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the `plot` extra
        raise ImportError("plots need matplotlib: pip install 'peftcore[plot]'") from e
    return plt


def split_name(module: str) -> tuple[int | None, str]:
    """"model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")."""
    found = LAYER.search(module)
    if not found:
        return None, module
    return int(found.group(1)), module[found.end():]


def kind_panels(plt, n: int, columns: int = 4):
    """One panel per module kind, up to `columns` a row, shared y; unused panels hidden. -> (fig, flat axes)."""
    rows, cols = -(-n // columns), min(n, columns)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def plot_spectra(stats: list[LayerStats], path: str | Path) -> Path:
    """Singular values of every layer's dW, one line per layer, grouped by module kind."""
    plt = pyplot()
    kinds = sorted({split_name(s.module)[1] for s in stats})
    fig, axes = kind_panels(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        layers = [s for s in stats if split_name(s.module)[1] == kind]
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        for k, s in enumerate(layers):
            ax.semilogy(range(1, len(s.singular_values) + 1), s.singular_values, color=cmap(k), lw=1.2,
                        label=f"layer {split_name(s.module)[0]}")
        ax.set_title(kind, fontsize=9), ax.set_xlabel("index i"), ax.grid(alpha=0.3)
    fig.supylabel("singular value of dW", fontsize=10)
    axes[len(kinds) - 1].legend(fontsize=7, loc="upper right")
    return save(fig, path)


def plot_relative_heatmap(stats: list[LayerStats], path: str | Path) -> Path:
    """Layer x module grid of ||dW||_F / ||W||_F (needs the base weights)."""
    plt = pyplot()
    known = [s for s in stats if s.relative_delta is not None]
    if not known:
        raise ValueError("||dW||/||W|| needs the base checkpoint: pass --base")
    layers = sorted({split_name(s.module)[0] for s in known if split_name(s.module)[0] is not None})
    kinds = sorted({split_name(s.module)[1] for s in known})
    grid = [[float("nan")] * len(kinds) for _ in layers]
    for s in known:
        layer, kind = split_name(s.module)
        if layer is not None:
            grid[layers.index(layer)][kinds.index(kind)] = s.relative_delta
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2, 0.35 * len(layers) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8)
    ax.set_ylabel("layer"), ax.set_title("||dW|| / ||W||")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def plot_similarity(comparison: dict[str, list[list[float]]], path: str | Path, max_panels: int = 8) -> Path:
    """phi(A1, A2, i, j) grids, one per shared module (the LoRA paper's Figure 3)."""
    plt = pyplot()
    modules = list(comparison)[:max_panels]
    fig, axes = plt.subplots(1, len(modules), figsize=(2.6 * len(modules), 2.8), squeeze=False)
    for ax, module in zip(axes[0], modules):
        image = ax.imshow(comparison[module], origin="lower", vmin=0, vmax=1, cmap="viridis",
                          extent=(0.5, len(comparison[module][0]) + 0.5, 0.5, len(comparison[module]) + 0.5))
        layer, kind = split_name(module)
        ax.set_title(f"{kind} L{layer}", fontsize=8), ax.set_xlabel("j"), ax.set_ylabel("i")
        for axis in (ax.xaxis, ax.yaxis):  # i and j count singular directions: 2.5 is not one
            axis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="phi")
    return save(fig, path)


def plot_training_norms(records: list[dict], path: str | Path) -> Path:
    """||dW|| / ||W|| of every adapted layer against the training step (metrics.jsonl's
    `adapter_stats`), one panel per module kind, colour by layer: which layers move, and when."""
    plt = pyplot()
    logged = [r for r in records if "adapter_stats" in r and "prompt" not in r["adapter_stats"]]
    if not logged:
        raise ValueError("no LoRA adapter_stats in the records: train with inspect_every > 0")
    modules = sorted(logged[-1]["adapter_stats"], key=lambda m: (split_name(m)[1], split_name(m)[0] or 0))
    kinds = sorted({split_name(m)[1] for m in modules})
    fig, axes = kind_panels(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        mine = [m for m in modules if split_name(m)[1] == kind]
        cmap = plt.get_cmap("viridis", max(len(mine), 2))
        for k, module in enumerate(mine):
            points = [(r["step"], r["adapter_stats"][module]["relative_delta"]) for r in logged
                      if module in r["adapter_stats"]]
            ax.plot(*zip(*points), color=cmap(k), lw=1.2, label=f"layer {split_name(module)[0]}")
        ax.set_title(kind, fontsize=9), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    fig.supylabel("||dW|| / ||W||", fontsize=10)
    axes[len(kinds) - 1].legend(fontsize=7, loc="upper left")
    return save(fig, path)


def plot_prompt_norms(stats: dict, path: str | Path) -> Path:
    """A prompt adapter (peftcore.analysis.prompts.prompt_tensor_stats): each virtual token's norm, and with the
    base where those norms fall in the vocabulary's norm distribution (a soft prompt far louder than
    any real token is one the model reads unlike text). Prefix tuning: key / value norm per layer."""
    plt = pyplot()
    if stats["method"] == "PREFIX_TUNING":
        return plot_prefix_norms(plt, stats, path)
    norms = [t["norm"] for t in stats["virtual_tokens"]]
    vocab = stats.get("vocab_norm")
    fig, axes = plt.subplots(1, 2 if vocab else 1, figsize=(11 if vocab else 6, 3.4), squeeze=False,
                             layout="constrained")
    bars = axes[0][0]
    bars.bar(range(len(norms)), norms, color="tab:orange", label="virtual token")
    if vocab:
        bars.axhspan(vocab["mean"] - vocab["std"], vocab["mean"] + vocab["std"], color="tab:blue", alpha=0.2,
                     label="vocabulary mean ± std")
        bars.legend(fontsize=7)
    bars.set_xlabel("virtual token"), bars.set_ylabel("L2 norm"), bars.set_title(stats["method"], fontsize=9)
    if vocab:
        hist, edges = axes[0][1], vocab["histogram"]["edges"]
        hist.stairs(vocab["histogram"]["counts"], edges, fill=True, color="tab:blue", alpha=0.5,
                    label="vocabulary rows")
        for k, norm in enumerate(norms):
            hist.axvline(norm, color="tab:orange", lw=1, label="virtual tokens" if k == 0 else None)
        hist.set_xlabel("L2 norm"), hist.set_ylabel("vocabulary rows"), hist.legend(fontsize=7)
        hist.set_title("virtual tokens vs the vocabulary's norms", fontsize=9)
    return save(fig, path)


def plot_prefix_norms(plt, stats: dict, path: str | Path) -> Path:
    """Mean key and value norm per layer, the band spanning the virtual tokens' min..max."""
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    layers = range(stats["num_layers"])
    for part, color in (("key", "tab:blue"), ("value", "tab:orange")):
        per_token = stats[f"{part}_norms"]  # [layer][token]
        ax.plot(layers, stats[f"{part}_norm_per_layer"], marker="o", color=color, label=f"{part} (mean)")
        ax.fill_between(layers, [min(r) for r in per_token], [max(r) for r in per_token], color=color, alpha=0.2)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("layer"), ax.set_ylabel("L2 norm per virtual token"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    ax.set_title(f"prefix: {stats['num_virtual_tokens']} virtual tokens", fontsize=9)
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_training_curves(records: list[dict], output_dir: str | Path) -> Path | None:
    """metrics.jsonl's records as curve.png (train and eval loss, and each task's in a multi-task run) and,
    when adapter statistics were logged, adapter_norms.png, in output_dir. None without matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    records = [{k: math.nan if v is None else v for k, v in r.items()} for r in records]  # skipped steps: gaps
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    for key in sorted({k for r in records for k in r if k.startswith(("loss/", "eval_loss/"))}):  # multi-task
        shown = [r for r in records if key in r]
        ax.plot([r["step"] for r in shown], [r[key] for r in shown], "o--" if key.startswith("eval") else "-",
                label=key.replace("loss/", "loss ", 1), lw=0.8, alpha=0.7)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    out = Path(output_dir) / "curve.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if any("adapter_stats" in r and "prompt" not in r["adapter_stats"] for r in records):
        plot_training_norms(records, Path(output_dir) / "adapter_norms.png")
    return out
