"""`peftcore inspect ADAPTER`: the table on the terminal, inspect.json and the plots of what an adapter
learned (peftcore.analysis: low-rank spectra for LoRA / DoRA, dense-update spectra for LoHa / LoKr, ranks kept
and their history for AdaLoRA, scaling vectors and rotation angles for IA3 / VeRA / OFT, norms and nearest tokens
for prompts).

One report function per kind of adapter, chosen by peft_type in run_inspect: a new method adds its peft_type to
READ and one branch there."""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Callable

from peftcore._logging import quiet
from peftcore.adapter_io import read_adapter_config
from peftcore.analysis import plots
from peftcore.analysis.adalora_ranks import format_rank_table, inspect_adalora_adapter, plot_rank_history, rank_history
from peftcore.analysis.adalora_ranks import rank_json as adalora_json
from peftcore.analysis.dense_delta import REPORTED as DENSE_METHODS
from peftcore.analysis.dense_delta import format_dense_table, inspect_dense_adapter, write_dense_json
from peftcore.analysis.lowrank import compare_adapters, format_similarity, format_table, inspect_adapter, write_json
from peftcore.analysis.method_vectors import REPORTED as VECTOR_METHODS
from peftcore.analysis.method_vectors import format_vector_table, inspect_method_adapter, vector_json
from peftcore.analysis.prompts import format_prompt_table, inspect_prompt_adapter, is_prompt_adapter, write_prompt_json
from peftcore.analysis.token_rows import format_token_table, inspect_token_rows
from peftcore.jobs.bases import resolve_base

log = logging.getLogger(__name__)
RUN_ADAPTER_FOLDERS = ("adapter", "best")  # what `peftcore train` names the adapters it saves
READ = ("LORA", "ADALORA", *VECTOR_METHODS, *DENSE_METHODS)  # peft_types with a report, besides the prompt methods
NO_BASE = ("PREFIX_TUNING", "ADALORA", *VECTOR_METHODS)  # reports that read nothing from the base


def run_inspect(adapter: Path, base: str | None = None, compare: Path | None = None, output_dir: Path | None = None,
                top_k: int = 5) -> list[Path]:
    """The table on the terminal, inspect.json and the PNG plots (in output_dir, default: the adapter
    folder) of a LoRA / DoRA, LoHa / LoKr, IA3 / VeRA / OFT or prompt-learning adapter. -> the files written."""
    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    kind, prompt = config.get("peft_type"), is_prompt_adapter(config)
    check_options(adapter, kind, prompt, compare, top_k)
    base_folder = None  # NO_BASE: prefix tuning's vectors are keys and values, not token embeddings
    if kind not in NO_BASE:
        base_folder = available_base(base or config.get("base_model_name_or_path"),
                                     "nearest vocabulary tokens" if prompt else "relative norms")
    out = Path(output_dir or adapter)
    out.mkdir(parents=True, exist_ok=True)
    if kind in VECTOR_METHODS:
        report = report_vectors(adapter, out)
    elif kind == "ADALORA":
        report = report_adalora(adapter, out)
    elif kind in DENSE_METHODS:
        report = report_dense(adapter, base_folder, out)
    elif prompt:
        report = report_prompt(adapter, base_folder, top_k, out)
    else:
        report = report_lora(adapter, base_folder, compare, out, config)
    written = [out / "inspect.json"] + write_plots(report, out)
    log.info("wrote " + ", ".join(str(p) for p in written))
    return written


def check_options(adapter: Path, kind: str | None, prompt: bool, compare: Path | None, top_k: int) -> None:
    """One line for an adapter no report reads, or an option that does not apply to it."""
    if not prompt and kind not in READ:
        raise ValueError(f"{adapter} holds a {kind} adapter: peftcore inspect reads LoRA / DoRA, AdaLoRA, LoHa, LoKr, "
                         "IA3, VeRA, OFT and prompt-learning adapters")
    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: list at least 1 nearest vocabulary token")
    if compare and kind != "LORA":
        raise ValueError("--compare measures LoRA subspaces; it does not apply to a "
                         + ("prompt-learning adapter" if prompt else f"{kind} adapter"))


def report_vectors(adapter: Path, out: Path) -> list[tuple]:
    """IA3 / VeRA vectors, OFT angles: the table and inspect.json; no plots."""
    stats = inspect_method_adapter(adapter)
    log.info(format_vector_table(stats))
    (out / "inspect.json").write_text(json.dumps(vector_json(stats), indent=1) + "\n")
    return []


def report_adalora(adapter: Path, out: Path) -> list[tuple]:
    """AdaLoRA: ranks kept, |E|, orthogonality; with the run's metrics.jsonl beside the adapter, the ranks over
    training. -> the rank-history heatmap to draw (none without a history)."""
    stats, history = inspect_adalora_adapter(adapter), rank_history(adapter)
    log.info(format_rank_table(stats))
    if not history:  # said here: the plot list below is empty then
        log.info("no rank history (the adapter is not in a run folder with metrics.jsonl, or no mask step ran)")
    (out / "inspect.json").write_text(json.dumps(adalora_json(stats, history), indent=1) + "\n")
    if not history:
        return []
    return [(functools.partial(plot_rank_history, stats=stats), history, "inspect_adalora_ranks.png")]


def report_dense(adapter: Path, base: Path | None, out: Path) -> list[tuple]:
    """LoHa / LoKr: the table and inspect.json. -> the spectra (and, with the base, the relative norms) to draw."""
    stats = inspect_dense_adapter(adapter, base)
    log.info(format_dense_table(stats))
    write_dense_json(stats, out / "inspect.json")
    drawn = [(plots.plot_spectra, stats, "inspect_spectra.png")]
    if base is not None:
        drawn.append((plots.plot_relative_heatmap, stats, "inspect_relative_norms.png"))
    return drawn


def report_prompt(adapter: Path, base: Path | None, top_k: int, out: Path) -> list[tuple]:
    """Prints the table and writes inspect.json. -> the plots to draw (see write_plots)."""
    stats = inspect_prompt_adapter(adapter, base, prompt_tokenizer(adapter, base), top_k)
    log.info(format_prompt_table(stats))
    write_prompt_json(stats, out / "inspect.json")
    return [(plots.plot_prompt_norms, stats, "inspect_prompt_norms.png")]


def report_lora(adapter: Path, base: Path | None, compare: Path | None, out: Path, config: dict) -> list[tuple]:
    stats = inspect_adapter(adapter, base)
    comparison = compare_adapters(adapter, compare) if compare else None
    log.info(format_table(stats))
    token_rows = inspect_token_rows(adapter, config, base)
    if token_rows:
        log.info(format_token_table(token_rows))
    names = shown_names(adapter, Path(compare)) if compare else None
    if comparison:
        log.info(format_similarity(comparison, *names))
    write_json(stats, out / "inspect.json", comparison, token_rows)
    drawn = [(plots.plot_spectra, stats, "inspect_spectra.png")]
    if base is not None:
        drawn.append((plots.plot_relative_heatmap, stats, "inspect_relative_norms.png"))
    if comparison:
        drawn.append((functools.partial(plots.plot_similarity, names=names), comparison, "inspect_similarity.png"))
    return drawn


def shown_names(first: Path, second: Path) -> tuple[str, str]:
    """The two folders' names, as the table and the plot call them; their paths where the names say nothing
    (every run saves `adapter` and `best`) or would not tell the two apart."""
    names = tuple(folder.name if folder.name not in RUN_ADAPTER_FOLDERS else str(folder) for folder in (first, second))
    return names if names[0] != names[1] else (str(first), str(second))


def available_base(name: str | None, skipped: str) -> Path | None:
    """The base folder, or None and one line naming what is left out: the adapter alone still has its numbers."""
    if not name:
        log.info(f"no base (adapter_config.json names none; pass --base): {skipped} skipped")
        return None
    try:
        with quiet():
            return resolve_base(name)
    except Exception as e:  # the adapter names a base that is not on this machine
        log.info(f"base {name!r} not available ({' '.join(str(e).split())}): {skipped} skipped")
        return None


def prompt_tokenizer(adapter: Path, base: Path | None):
    """The adapter's tokenizer (peftcore train copies it there), else the base's; None: ids are shown."""
    from peftcore.models import load_tokenizer

    if base is None:
        return None
    folder = adapter if (adapter / "tokenizer.json").is_file() else base
    if not (folder / "tokenizer.json").is_file():
        log.info(f"no tokenizer.json in {adapter} or {base}: nearest tokens shown as ids")
        return None
    return load_tokenizer(folder)


def write_plots(drawn: list[tuple[Callable, object, str]], out: Path) -> list[Path]:
    """(a peftcore.analysis.plots function, what it draws, file name) each; none without matplotlib."""
    try:
        return [plot(value, out / file) for plot, value, file in drawn]
    except ImportError as e:  # matplotlib is the optional `plot` extra
        log.info(f"plots skipped: {e}")
        return []
