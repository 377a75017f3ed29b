"""What an AdaLoRA adapter kept, straight from its folder (no model needed), and how its ranks fell in training.

Per adapted layer: the rank kept (rank_pattern's True entries of init_r; every triplet before the first mask),
the kept singular values |E| largest first, ||dW||_F of B diag(E) A * scaling / init_r, and how far A's rows
and B's columns are from orthonormal (||A A^T - I||_F, ||B^T B - I||_F: the penalty keeps them near 0, which
is what makes E the update's singular values). When the folder sits in a run folder (runs/<t>/adapter, .../best,
.../checkpoint/adapter), metrics.jsonl holds the ranks after every mask step: the history drawn as a heatmap.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peftcore.adalora.layer import RANKNUM_EPS, svd_scaling
from peftcore.adapter_io import adapter_weights, read_adapter_config
from peftcore.analysis import plots
from peftcore.analysis.lowrank import natural_key

SVD_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E)$")


@dataclass
class RankStats:
    module: str
    init_r: int
    rank: int  # triplets kept
    singular_values: list[float] = field(default_factory=list)  # |E| of the kept triplets, largest first
    delta_norm: float = 0.0
    a_orthogonality: float = 0.0  # ||A A^T - I||_F over the kept rows
    b_orthogonality: float = 0.0


def layer_stats(module: str, parts: dict[str, torch.Tensor], config: dict) -> RankStats:
    A, B, E = (parts[p].double() for p in ("lora_A", "lora_B", "lora_E"))  # (r, in), (out, r), (r, 1)
    init_r, alpha = config.get("init_r", 12), config.get("lora_alpha", 8)
    scaling = svd_scaling(alpha, init_r) / (init_r + RANKNUM_EPS)  # ranknum stays init_r, pruned or not
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return RankStats(module, init_r, A.shape[0], sorted(E.abs().flatten().tolist(), reverse=True),
                     float(torch.linalg.matrix_norm(B @ (A * E)) * scaling),
                     float(torch.linalg.matrix_norm(A @ A.T - eye)), float(torch.linalg.matrix_norm(B.T @ B - eye)))


def inspect_adalora_adapter(folder: str | Path) -> list[RankStats]:
    """One entry per adapted layer of the AdaLoRA adapter in `folder`, in layer order."""
    config = read_adapter_config(folder)
    if config.get("peft_type") != "ADALORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; this report reads ADALORA adapters")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    _, _, tensors = adapter_weights(folder)
    for key, tensor in tensors:
        if (match := SVD_KEY.match(key)) is not None:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    incomplete = [m for m, p in parts.items() if len(p) != 3]
    if incomplete:
        raise ValueError(f"{folder}: {incomplete[0]} lacks one of lora_A / lora_B / lora_E")
    return [layer_stats(m, parts[m], config) for m in sorted(parts, key=natural_key)]


def rank_history(folder: str | Path) -> list[dict]:
    """[{"step", "budget", "ranks": {module: rank}}] from the metrics.jsonl of the run the adapter came from
    (the folder's parent or grandparent); [] when there is none."""
    folder = Path(folder).resolve()
    for run in (folder.parent, folder.parent.parent):
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            records = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
            return [{"step": r["step"], "budget": r.get("adalora_budget"), "ranks": r["adalora_ranks"]}
                    for r in records if isinstance(r, dict) and "adalora_ranks" in r]
    return []


def format_rank_table(stats: list[RankStats]) -> str:
    header = f"{'module':<44} {'rank':>9} {'top |E|':>24} {'||dW||':>9} {'||AA^T-I||':>11} {'||B^TB-I||':>11}"
    lines = [header, "-" * len(header)]
    for s in stats:
        top = ", ".join(f"{v:.3g}" for v in s.singular_values[:3]) or "-"
        lines.append(f"{s.module[-44:]:<44} {f'{s.rank}/{s.init_r}':>9} {top:>24} {s.delta_norm:>9.4f} "
                     f"{s.a_orthogonality:>11.3f} {s.b_orthogonality:>11.3f}")
    kept, total = sum(s.rank for s in stats), sum(s.init_r for s in stats)
    lines.append(f"{len(stats)} layers: {kept} of {total} triplets kept (mean rank {kept / max(len(stats), 1):.2f})")
    return "\n".join(lines)


def rank_json(stats: list[RankStats], history: list[dict]) -> dict:
    return {"method": "ADALORA", "layers": [asdict(s) for s in stats], "rank_history": history}


def plot_rank_history(history: list[dict], path: str | Path, stats: list[RankStats] = ()) -> Path:
    """Ranks per layer (rows) after each mask step (columns), with the budget above: where the pruning went."""
    plt = plots.pyplot()
    modules = [s.module for s in stats] or sorted(history[-1]["ranks"], key=natural_key)
    grid = [[h["ranks"].get(m, 0) for h in history] for m in modules]
    fig, (top, ax) = plt.subplots(2, 1, figsize=(min(4 + 0.25 * len(history), 14), 2 + 0.3 * len(modules)),
                                  gridspec_kw={"height_ratios": [1, max(2, len(modules) / 4)]}, sharex=True)
    steps = [h["step"] for h in history]
    top.plot(range(len(steps)), [h["budget"] for h in history], marker=".")
    top.set_ylabel("budget")
    top.set_title("AdaLoRA: triplets kept per layer after each allocation")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), [m[-40:] for m in modules], fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("training step")
    fig.colorbar(image, ax=ax, label="rank")
    return plots.save(fig, path)
