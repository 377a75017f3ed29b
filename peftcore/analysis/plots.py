"""Pictures of what `peftcore.analysis.lowrank` computes, for a person to look at (matplotlib, optional extra).
Each plot_* function draws a *_figure (a matplotlib Figure, which tests inspect) and saves it."""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

from peftcore.analysis.lowrank import LayerStats

LAYER = re.compile(r"\.(\d+)\.")
TITLE_SIZE, SUPTITLE_SIZE, LEGEND_SIZE, TICK_SIZE = 10, 11, 8, 8
METHOD_NAMES = {"PROMPT_TUNING": "prompt tuning", "P_TUNING": "P-tuning", "PREFIX_TUNING": "prefix tuning",
                "MULTITASK_PROMPT_TUNING": "multitask prompt tuning"}
LOSS_UNIT = "cross-entropy (nats per target)"  # the loop's: summed over targets (tokens; a classifier's rows) / count


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


def method_name(peft_type: str) -> str:
    """"PROMPT_TUNING" -> "prompt tuning": a reader of the picture need not know the config enum."""
    return METHOD_NAMES.get(peft_type, peft_type.lower().replace("_", " "))


def integer_ticks(plt, *axes) -> None:
    """For axes that count things (tokens, layers, directions): a tick at 2.5 names nothing."""
    for axis in axes:
        axis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))


def kind_panels(plt, n: int, columns: int = 4):
    """One panel per module kind, up to `columns` a row, shared y; unused panels hidden. -> (fig, flat axes)."""
    rows, cols = -(-n // columns), min(n, columns)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows + 0.4), squeeze=False, sharey=True,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def plot_spectra(stats: list[LayerStats], path: str | Path) -> Path:
    """Singular values of every layer's dW, one line per layer, grouped by module kind. `stats`: LoRA's LayerStats
    or LoHa / LoKr's dense_delta.DeltaStats (both have module, singular_values, numerical_rank, relative_delta)."""
    return save(spectra_figure(pyplot(), stats), path)


def spectra_figure(plt, stats: list[LayerStats]):
    """Each layer's singular values above round-off (LayerStats.numerical_rank): a combined adapter's zero padding
    would drop its line off the log axis, and an svd combination's round-off directions (~1e-7) squash the rest."""
    kinds = sorted({split_name(s.module)[1] for s in stats})
    fig, axes = kind_panels(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        layers = [s for s in stats if split_name(s.module)[1] == kind]
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        for k, s in enumerate(layers):
            shown = shown_singular_values(s)
            ax.semilogy(range(1, len(shown) + 1), shown, color=cmap(k), lw=1.2,
                        label=f"layer {split_name(s.module)[0]}")
        ax.set_title(kind, fontsize=TITLE_SIZE), ax.set_xlabel("i (i-th largest)"), ax.grid(alpha=0.3)
        integer_ticks(plt, ax.xaxis)
    cut = sum(len(shown_singular_values(s)) < len(s.singular_values) for s in stats)
    fig.suptitle("singular values of each layer's update dW, by module"
                 + (f"\n(round-off-level values left out in {cut} layer(s): dW has fewer directions than its "
                    "factors allow)" if cut else ""), fontsize=SUPTITLE_SIZE)
    fig.supylabel("i-th singular value of dW", fontsize=TITLE_SIZE)
    axes[len(kinds) - 1].legend(fontsize=LEGEND_SIZE, loc="upper right")
    return fig


def shown_singular_values(s: LayerStats) -> list[float]:
    """The singular values a log axis can show: those above round-off (all, for stats without numerical_rank)."""
    return s.singular_values if s.numerical_rank is None else s.singular_values[:s.numerical_rank]


def plot_relative_heatmap(stats: list[LayerStats], path: str | Path) -> Path:
    """Layer x module grid of ||dW||_F / ||W||_F (needs the base weights)."""
    return save(relative_heatmap_figure(pyplot(), stats), path)


def relative_heatmap_figure(plt, stats: list[LayerStats]):
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
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 0.35 * len(layers) + 1.8), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=TICK_SIZE)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=TICK_SIZE)
    ax.set_ylabel("layer"), ax.set_title("relative update ||dW||_F / ||W||_F", fontsize=TITLE_SIZE)
    fig.colorbar(image, ax=ax, label="||dW|| / ||W||")
    return fig


def plot_similarity(comparison: dict[str, list[list[float]]], path: str | Path, max_panels: int = 8,
                    names: tuple[str, str] = ("the first adapter", "the second adapter")) -> Path:
    """phi(A1, A2, i, j) grids, one per shared module (the LoRA paper's Figure 3); `names`: the two
    adapters, rows (i) and columns (j) in compare_adapters' order."""
    return save(similarity_figure(pyplot(), comparison, names, max_panels), path)


def similarity_figure(plt, comparison: dict[str, list[list[float]]], names: tuple[str, str], max_panels: int = 8):
    first, second = names
    modules = list(comparison)[:max_panels]
    width = max(2.6 * len(modules) + 1.2, 5.5)  # room for the colour bar and, with one panel, for the title
    fig, axes = plt.subplots(1, len(modules), figsize=(width, 3.8), squeeze=False, layout="constrained")
    for ax, module in zip(axes[0], modules):
        image = ax.imshow(comparison[module], origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                          extent=(0.5, len(comparison[module][0]) + 0.5, 0.5, len(comparison[module]) + 0.5))
        layer, kind = split_name(module)
        ax.set_title(f"{kind} L{layer}", fontsize=TITLE_SIZE), ax.set_xlabel("j"), ax.set_ylabel("i")
        integer_ticks(plt, ax.xaxis, ax.yaxis)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="phi (1: the same subspace)")
    fig.suptitle(f"subspace similarity phi(i, j) of lora_A's top singular directions\nrows i: {first}    "
                 f"columns j: {second}", fontsize=SUPTITLE_SIZE)
    # vertical text runs out of figure height long before horizontal text runs out of width
    rows_label = textwrap.fill(f"i: top-i singular directions of {first}", 40, break_on_hyphens=False)
    fig.supylabel(rows_label, fontsize=TITLE_SIZE)
    fig.supxlabel(f"j: top-j singular directions of {second}", fontsize=TITLE_SIZE)
    return fig


def plot_training_norms(records: list[dict], path: str | Path) -> Path:
    """||dW|| / ||W|| of every adapted layer against the training step (metrics.jsonl's
    `adapter_stats`), one panel per module kind, colour by layer: which layers move, and when."""
    return save(training_norms_figure(pyplot(), records), path)


def training_norms_figure(plt, records: list[dict]):
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
        ax.set_title(kind, fontsize=TITLE_SIZE), ax.set_xlabel("step"), ax.grid(alpha=0.3)
        integer_ticks(plt, ax.xaxis)
    fig.suptitle("relative update ||dW||_F / ||W||_F of each layer during training", fontsize=SUPTITLE_SIZE)
    fig.supylabel("||dW|| / ||W||", fontsize=TITLE_SIZE)
    axes[len(kinds) - 1].legend(fontsize=LEGEND_SIZE, loc="upper left")
    return fig


def plot_prompt_norms(stats: dict, path: str | Path) -> Path:
    """A prompt adapter (peftcore.analysis.prompts.prompt_tensor_stats): each virtual token's norm, and with the
    base where those norms fall in the vocabulary's norm distribution (a soft prompt far louder than
    any real token is one the model reads unlike text). Prefix tuning: key / value norm per layer."""
    return save(prompt_norms_figure(pyplot(), stats), path)


def plot_prefix_norms(stats: dict, path: str | Path) -> Path:
    """Mean key and value norm per layer, the band spanning the virtual tokens' min..max."""
    return save(prefix_norms_figure(pyplot(), stats), path)


def prompt_norms_figure(plt, stats: dict):
    if stats["method"] == "PREFIX_TUNING":
        return prefix_norms_figure(plt, stats)
    norms = [t["norm"] for t in stats["virtual_tokens"]]
    vocab = stats.get("vocab_norm")
    fig, axes = plt.subplots(1, 2 if vocab else 1, figsize=(12 if vocab else 6.5, 3.8), squeeze=False,
                             layout="constrained")
    bars = axes[0][0]
    bars.bar(range(len(norms)), norms, color="tab:orange", label="virtual token")
    if vocab:
        bars.axhspan(vocab["mean"] - vocab["std"], vocab["mean"] + vocab["std"], color="tab:blue", alpha=0.2,
                     label="vocabulary mean ± std")
        bars.legend(fontsize=LEGEND_SIZE)
    integer_ticks(plt, bars.xaxis)
    bars.set_xlabel("virtual token (position in the prompt)"), bars.set_ylabel("L2 norm")
    bars.set_title(f"{method_name(stats['method'])}: norm of each of the {len(norms)} virtual tokens",
                   fontsize=TITLE_SIZE)
    if vocab:
        draw_vocabulary_norms(axes[0][1], vocab, norms)
    return fig


def draw_vocabulary_norms(ax, vocab: dict, norms: list[float]) -> None:
    """The vocabulary's row-norm histogram with a line at each virtual token's norm."""
    ax.stairs(vocab["histogram"]["counts"], vocab["histogram"]["edges"], fill=True, color="tab:blue", alpha=0.5,
              label="vocabulary rows")
    for k, norm in enumerate(norms):
        ax.axvline(norm, color="tab:orange", lw=1, label="virtual tokens" if k == 0 else None)
    ax.set_xlabel("L2 norm"), ax.set_ylabel("vocabulary rows"), ax.legend(fontsize=LEGEND_SIZE)
    ax.set_title("virtual tokens' norms among the vocabulary's embedding norms", fontsize=TITLE_SIZE)


def prefix_norms_figure(plt, stats: dict):
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    layers = range(stats["num_layers"])
    for part, color in (("key", "tab:blue"), ("value", "tab:orange")):
        per_token = stats[f"{part}_norms"]  # [layer][token]
        ax.plot(layers, stats[f"{part}_norm_per_layer"], marker="o", color=color, label=f"{part} (mean)")
        ax.fill_between(layers, [min(r) for r in per_token], [max(r) for r in per_token], color=color, alpha=0.2,
                        label=f"{part} (min..max over tokens)")
    integer_ticks(plt, ax.xaxis)
    ax.set_xlabel("layer"), ax.set_ylabel("L2 norm per virtual token"), ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE)
    ax.set_title(f"prefix tuning: key and value norm per layer ({stats['num_virtual_tokens']} virtual tokens)",
                 fontsize=TITLE_SIZE)
    return fig


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
    out = save(curve_figure(plt, records), Path(output_dir) / "curve.png")
    if any("adapter_stats" in r and "prompt" not in r["adapter_stats"] for r in records):
        plot_training_norms(records, Path(output_dir) / "adapter_norms.png")
    return out


def curve_figure(plt, records: list[dict]):
    """Train loss from the step records; eval loss from every record that has one, the step-0 evaluation
    (eval keys only, no "loss": the adapter as initialised) first."""
    records = [{k: math.nan if v is None else v for k, v in r.items()} for r in records]  # skipped steps: gaps
    trained = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train loss (one batch)", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    for key in sorted({k for r in records for k in r if k.startswith(("loss/", "eval_loss/"))}):  # multi-task
        shown = [r for r in records if key in r]
        evaluated = key.startswith("eval")
        ax.plot([r["step"] for r in shown], [r[key] for r in shown], "o--" if evaluated else "-",
                label=f"{'eval' if evaluated else 'train'} loss: {key.split('/', 1)[1]}", lw=0.8, alpha=0.7)
    ax.set_title("train loss (per logged step) and eval loss", fontsize=TITLE_SIZE)
    ax.set_xlabel("optimizer step"), ax.set_ylabel(LOSS_UNIT)
    integer_ticks(plt, ax.xaxis)
    ax.legend(fontsize=LEGEND_SIZE), ax.grid(alpha=0.3)
    return fig
