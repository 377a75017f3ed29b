"""The pictures a person reads: which adapter is which, integer ticks where things are counted, titles in words
(no config enums), and a loss curve that starts at the step-0 evaluation."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("matplotlib")

from peftcore.analysis import plots  # noqa: E402
from peftcore.analysis.lowrank import layer_stats, subspace_similarity  # noqa: E402
from peftcore.jobs.inspect import run_inspect, shown_names  # noqa: E402

ENUM = re.compile(r"\b[A-Z]+(?:_[A-Z]+)+\b")  # PROMPT_TUNING, P_TUNING, PREFIX_TUNING
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.pyplot().close("all")


def captured_figures(monkeypatch) -> list:
    """Every figure a plot_* function saves, still open for a test to read."""
    figures, real_save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    monkeypatch.setattr(plots.pyplot(), "close", lambda fig=None: None)
    return figures


def texts(fig) -> list[str]:
    """Every title and label a reader sees: the figure's own and each axes'."""
    found = [fig.get_suptitle(), fig.get_supxlabel(), fig.get_supylabel()]
    for ax in fig.axes:
        found += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    return [t for t in found if t]


def integer_ticks_shown(ax, axis: str = "x") -> list[float]:
    ax.figure.canvas.draw()
    low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    shown = [float(t) for t in ticks if low <= t <= high]
    assert shown and all(t.is_integer() for t in shown), shown
    return shown


def grids(ranks=(("q_proj", 1), ("v_proj", 8))) -> dict:
    torch.manual_seed(0)
    return {f"model.layers.0.self_attn.{m}": subspace_similarity(torch.randn(r, 16), torch.randn(r, 16)).tolist()
            for m, r in ranks}


def test_the_similarity_figure_says_which_adapter_is_i_and_which_is_j():
    fig = plots.similarity_figure(plots.pyplot(), grids(), ("lora-r8-seed1", "dora-r8-seed2"))
    assert "lora-r8-seed1" in fig.get_supylabel() and fig.get_supylabel().startswith("i:")
    assert "dora-r8-seed2" in fig.get_supxlabel() and fig.get_supxlabel().startswith("j:")
    assert "lora-r8-seed1" in fig.get_suptitle() and "dora-r8-seed2" in fig.get_suptitle()


def test_plot_similarity_keeps_its_old_call_form(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    path = plots.plot_similarity(grids(), tmp_path / "phi.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "first adapter" in figures[0].get_supylabel() and "second adapter" in figures[0].get_supxlabel()


def write_lora(folder: Path, seed: int, r: int = 4, width: int = 16) -> Path:
    """An HF PEFT-shaped LoRA folder without a base: what `inspect --compare` reads."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"base_model.model.{m}.lora_{part}.weight": torch.randn(*shape, generator=g)
               for m in MODULES for part, shape in (("A", (r, width)), ("B", (width, r)))}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_inspect_compare_names_both_adapter_folders_in_the_similarity_plot(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    first, second = write_lora(tmp_path / "lora-seed1", 1), write_lora(tmp_path / "lora-seed2", 2)
    written = run_inspect(first, compare=second, output_dir=tmp_path / "out")
    assert tmp_path / "out" / "inspect_similarity.png" in written
    similarity = next(fig for fig in figures if "subspace similarity" in fig.get_suptitle())
    assert "lora-seed1" in similarity.get_supylabel() and "lora-seed2" in similarity.get_supxlabel()


def test_adapter_names_are_paths_where_the_folder_name_says_nothing():
    assert shown_names(Path("x/lora8"), Path("y/lora16")) == ("lora8", "lora16")
    assert shown_names(Path("runs/a/adapter"), Path("runs/b/best")) == ("runs/a/adapter", "runs/b/best")
    assert shown_names(Path("a/same"), Path("b/same")) == ("a/same", "b/same")


def prompt_stats(method: str = "P_TUNING", n: int = 20, vocab: bool = True) -> dict:
    stats = {"method": method, "num_virtual_tokens": n, "virtual_tokens": [{"norm": 1.0 + k / n} for k in range(n)]}
    if vocab:
        stats["vocab_norm"] = {"mean": 1.2, "std": 0.1,
                               "histogram": {"edges": [0.5 + k / 10 for k in range(11)], "counts": [3] * 10}}
    return stats


@pytest.mark.parametrize("n", [3, 20])
def test_prompt_norm_bars_count_tokens_in_integers_under_a_title_in_words(n):
    fig = plots.prompt_norms_figure(plots.pyplot(), prompt_stats(n=n))
    bars = fig.axes[0]
    assert set(integer_ticks_shown(bars)) <= set(range(n))
    assert bars.get_title() == f"P-tuning: norm of each of the {n} virtual tokens"
    assert not [t for t in texts(fig) if ENUM.search(t)]
    assert all(ax.title.get_fontsize() >= 9 for ax in fig.axes)


def test_many_virtual_tokens_get_tick_labels_that_do_not_overlap():
    fig = plots.prompt_norms_figure(plots.pyplot(), prompt_stats("PROMPT_TUNING", n=100, vocab=False))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = sorted((label.get_window_extent(renderer) for label in fig.axes[0].get_xticklabels()
                    if label.get_text()), key=lambda box: box.x0)
    assert len(boxes) > 2 and all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    assert fig.axes[0].get_title().startswith("prompt tuning: ")


def test_prefix_norms_count_layers_in_integers_under_a_title_in_words():
    layers, n = 3, 5
    per_layer = [[1.0 + t for t in range(n)] for _ in range(layers)]
    stats = {"method": "PREFIX_TUNING", "num_virtual_tokens": n, "num_layers": layers, "key_norms": per_layer,
             "value_norms": per_layer, "key_norm_per_layer": [3.0] * layers, "value_norm_per_layer": [2.0] * layers}
    fig = plots.prompt_norms_figure(plots.pyplot(), stats)
    assert set(integer_ticks_shown(fig.axes[0])) <= set(range(layers))
    assert fig.axes[0].get_title().startswith("prefix tuning: ") and f"{n} virtual tokens" in fig.axes[0].get_title()
    assert not [t for t in texts(fig) if ENUM.search(t)]


def lora_stats(with_base: bool = True) -> list:
    torch.manual_seed(0)
    return [layer_stats(m, torch.randn(4, 16), torch.randn(16, 4), 2.0, torch.randn(16, 16) if with_base else None,
                        None) for m in MODULES]


def test_the_lora_figures_say_what_quantity_they_show():
    plt = plots.pyplot()
    stats = lora_stats()
    records = [{"step": s, "adapter_stats": {m: {"relative_delta": 0.1 * s} for m in MODULES}} for s in (2, 4)]
    spectra, heatmap = plots.spectra_figure(plt, stats), plots.relative_heatmap_figure(plt, stats)
    norms = plots.training_norms_figure(plt, records)
    assert "singular values" in spectra.get_suptitle()
    assert "||dW||_F / ||W||_F" in heatmap.axes[0].get_title()
    assert "during training" in norms.get_suptitle() and "||dW||_F / ||W||_F" in norms.get_suptitle()
    for fig in (spectra, heatmap, norms):
        titles = [ax.title for ax in fig.axes if ax.get_title()] + [text for text in fig.texts if text.get_text()]
        assert titles and all(title.get_fontsize() >= plots.TITLE_SIZE for title in titles)


def line(ax, label: str):
    return next(drawn for drawn in ax.get_lines() if drawn.get_label() == label)


def test_the_curve_starts_with_the_step_0_evaluation(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    records = [{"step": 0, "eval_loss": 3.2, "eval_ppl": 24.5},
               {"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": None, "lr": 1e-3},  # a skipped step
               {"step": 3, "loss": 2.8, "lr": 1e-3, "eval_loss": 2.9, "eval_ppl": 18.2}]
    assert plots.plot_training_curves(records, tmp_path) == tmp_path / "curve.png"
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    assert list(line(ax, "eval loss").get_xdata()) == [0, 3]
    assert list(line(ax, "eval loss").get_ydata()) == [3.2, 2.9]
    train = line(ax, "train loss (one batch)")
    assert list(train.get_xdata()) == [1, 2, 3] and math.isnan(train.get_ydata()[1])
    assert "train loss" in ax.get_title() and "eval loss" in ax.get_title()
    assert "nats per target" in ax.get_ylabel()


def test_a_multi_task_curve_starts_each_task_at_its_step_0_evaluation(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    records = [{"step": 0, "eval_loss": 3.0, "eval_loss/sum": 3.1, "eval_loss/copy": 2.9},
               {"step": 1, "loss": 2.9, "loss/sum": 3.0, "loss/copy": 2.8},
               {"step": 2, "loss": 2.5, "loss/sum": 2.6, "eval_loss": 2.6, "eval_loss/sum": 2.7, "eval_loss/copy": 2.5}]
    plots.plot_training_curves(records, tmp_path)
    ax = figures[0].axes[0]
    assert list(line(ax, "eval loss: sum").get_xdata()) == [0, 2]
    assert list(line(ax, "eval loss: copy").get_xdata()) == [0, 2]
    assert list(line(ax, "train loss: copy").get_xdata()) == [1]
